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

__all__ = ["MetricsLog", "ProgressBar", "plot_losses", "peak_memory_gib"]


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


class ProgressBar:
    """tqdm on stderr in a terminal. In Jupyter, tqdm.auto draws a notebook widget instead (with ipywidgets
    installed; without, it falls back to the text bar and says so)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr, desc="train"
            )

    def update(self, loss: float, lr: float, tokens_per_s: float, mem_gib: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"loss={loss:.4f} lr={lr:.2e} tok/s={tokens_per_s:,.0f} mem={mem_gib:.1f}GiB", refresh=False
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


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    """Train loss per step and eval loss at its steps; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = MetricsLog.read(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if _finite(r.get("loss"))]
    evals = [(r["step"], r["eval_loss"]) for r in rows if _finite(r.get("eval_loss"))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
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
