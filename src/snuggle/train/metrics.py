"""What a run reports: metrics.jsonl (one JSON object per logged step), a progress bar, a loss-curve PNG."""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from snuggle.errors import SnuggleError

__all__ = ["MetricsLog", "ProgressBar", "plot_losses", "peak_memory_gib", "phase_notes"]


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLog:
    """Append-only JSONL; on resume, rows past the resumed step are dropped so the curve continues cleanly."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        try:
            if resume_step is not None and path.exists():
                # the rows of steps after the checkpoint (and a line torn by a kill) go: the resumed
                # run writes them again, so every step appears once, in order
                rows = [r for r in self.read(path) if r.get("step", 0) <= resume_step]
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(_line(r) for r in rows))
                os.replace(tmp, path)
            self._fh = open(path, "a")
        except OSError as e:
            raise _write_error(path, e) from None

    def write(self, row: dict[str, Any]) -> None:
        try:
            self._fh.write(_line(row))
            self._fh.flush()
        except OSError as e:
            raise _write_error(self.path, e) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a full disk was already reported by write()
            self._fh.close()

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a killed run
        return rows


def _line(row: dict[str, Any]) -> str:
    """One strict JSON line: a non-finite number (a skipped step's grad_norm) is null, as JSON has no NaN."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def phase_notes(enabled: bool):
    """`note(what)`: a line on a terminal's stderr naming the setup phase that starts (loading the model,
    tokenizing), so the minutes before the step bar are not silent. Only where a person watches (a
    terminal and train.progress): logs and pipes keep their lines to results and errors."""
    show = enabled and sys.stderr.isatty()

    def note(what: str) -> None:
        if show:
            print(f"snuggle: {what} ...", file=sys.stderr, flush=True)

    return note


class ProgressBar:
    """The step bar on stderr: the phase it is in (training, evaluating, checkpointing), and a remaining
    time from the steady steps alone. tqdm's own estimate counts the first step (warm-up, the step-0
    evaluation before it) as a typical one: 1:50:43 at step 1 of a 10-minute run. In Jupyter, tqdm.auto
    draws a notebook widget instead (with ipywidgets installed; without, the text bar)."""

    WINDOW = 20  # steps the remaining time is averaged over

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        self.total, self.done = total, initial
        self._steady: list[float] = []  # seconds of the recent steps, the first of this process left out
        self._first = True
        self._postfix = ""
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                desc="train",
                # no tqdm rate or remaining time: ours (in the postfix) leaves the warm-up out
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )

    def phase(self, name: str) -> None:
        """What the run does now, in the bar's label: a long evaluation or checkpoint is not a stuck step."""
        if self.bar is not None:
            self.bar.set_description_str(name)

    def eta_s(self) -> float | None:
        """Seconds left at the mean pace of the recent steady steps; None before there is one."""
        if not self._steady:
            return None
        return sum(self._steady) / len(self._steady) * (self.total - self.done)

    def update(
        self, loss: float, lr: float, tokens_per_s: float, mem_gib: float, step_time_s: float | None = None
    ) -> None:
        self.done += 1
        if step_time_s is not None:
            if not self._first:
                self._steady = [*self._steady, step_time_s][-self.WINDOW :]
            self._first = False
        if self.bar is not None:
            eta = self.eta_s()
            self.bar.set_postfix_str(
                f"loss={loss:.4f} lr={lr:.2e} tok/s={tokens_per_s:,.0f} mem={mem_gib:.1f}GiB "
                f"eta={'?' if eta is None else _clock(eta)}",  # ? until a steady step is timed
                refresh=False,
            )
            self.bar.update(1)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def smoothed(values: list[float], span: int) -> list[float]:
    """Exponential moving average over `span` points (alpha = 2 / (span + 1)), bias-corrected so that the
    first points are not pulled toward 0: the trend under a per-step loss that swings by +-0.4."""
    alpha, avg, weight, out = 2.0 / (span + 1), 0.0, 0.0, []
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def plot_title(cfg, global_batch: int) -> str:
    """The run's name and the settings that shape its curve, for the loss plot."""
    what = f"LoRA r={cfg.lora.r}" if cfg.use_lora else "full fine-tuning"
    if cfg.use_lora and cfg.lora.train_embeddings:
        what += " + embeddings"
    return (
        f"{Path(cfg.train.output_dir).name}: {Path(cfg.model.path).name}, {what}\n"
        f"lr {cfg.train.lr:g} ({cfg.train.schedule}), batch {global_batch} x {cfg.data.seq_len} tokens, "
        f"{cfg.train.steps} steps"
    )


def loss_figure(rows: list[dict[str, Any]], title: str | None = None):
    """The loss figure: the raw per-step loss faint, its moving average over it, the held-out loss as
    markers (a few evaluations joined by lines read as a trend they do not measure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if _finite(r.get("loss"))]
    evals = [(r["step"], r["eval_loss"]) for r in rows if _finite(r.get("eval_loss"))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps, losses = zip(*train, strict=True)
        span = max(1, min(50, len(losses) // 10))  # ~a tenth of the run, at most 50 steps
        ax.plot(steps, losses, lw=0.8, alpha=0.3, color="C0", label="train loss (per step)")
        if span > 1:
            ax.plot(
                steps, smoothed(list(losses), span), lw=1.8, color="C0", label=f"train loss ({span}-step EMA)"
            )
    if evals:
        ax.plot(*zip(*evals, strict=True), "o", ls="none", ms=6, color="C3", label="held-out loss")
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_losses(metrics_path: Path, out_png: Path, title: str | None = None) -> None:
    """Train loss per step (raw and smoothed) and eval loss at its steps; written atomically."""
    import matplotlib.pyplot as plt

    fig = loss_figure(MetricsLog.read(metrics_path), title)
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, out_png)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(out_png, e) from None
    finally:
        plt.close(fig)


def _write_error(path: Path, e: OSError) -> SnuggleError:
    """A run file the filesystem refused (full disk, quota, permissions), in one line with the free space."""
    try:
        free = f"; {shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there"
    except OSError:
        free = ""
    return SnuggleError(f"cannot write {path}: {e.strerror or e}{free}")
