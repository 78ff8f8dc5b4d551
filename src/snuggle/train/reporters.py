"""Optional experiment trackers (`train.report_to`), fed exactly the rows written to metrics.jsonl.

metrics.jsonl is always written and stays the record of a run; a reporter mirrors its rows elsewhere:
`tensorboard` as scalars under `<output_dir>/tensorboard`, `wandb` as a Weights & Biases run (mode from
`WANDB_MODE`: `offline` needs no network and no account). Only rank 0 reports. A training row's keys go
under `train/`, an evaluation row's (`eval_loss`, ...) under `eval/`, both at the row's `step`.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from snuggle.config import REPORTER_NAMES
from snuggle.errors import SnuggleError

__all__ = ["REPORTERS", "Reporter", "check_reporters", "open_reporters"]

# name -> the package it needs (what `pip install` takes); each is also an extra: pip install snuggle[wandb]
REPORTERS: dict[str, str] = {name: name for name in REPORTER_NAMES}
_RUN_ID_FILE = "run-id"  # a resumed run continues the same W&B run


def check_reporters(names: list[str]) -> None:
    """Unknown names and missing packages fail here, before the run writes anything."""
    for name in names:
        if name not in REPORTERS:
            raise SnuggleError(f"train.report_to: unknown reporter {name!r}; known: {', '.join(REPORTERS)}")
        pkg = REPORTERS[name]
        if importlib.util.find_spec(pkg) is None:
            raise SnuggleError(f"train.report_to: {name} needs the '{pkg}' package: pip install {pkg}")


def _scalars(row: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {"train/loss": ..., "eval/loss": ...}) of one metrics.jsonl row; non-finite values kept."""
    step = int(row["step"])
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if key.startswith("eval_"):
            out[f"eval/{key.removeprefix('eval_')}"] = float(value)
        else:
            out[f"train/{key}"] = float(value)
    return step, out


class Reporter:
    """Receives every metrics.jsonl row of rank 0; `close` at the end of the run (or when it fails)."""

    def log(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardReporter(Reporter):
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, row: dict[str, Any]) -> None:
        step, scalars = _scalars(row)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        # flushed per row, as metrics.jsonl is: a live TensorBoard shows the run as it goes
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    def __init__(self, out: Path, project: str, config: dict[str, Any], resume: bool) -> None:
        import wandb

        # WANDB_DIR, when set, wins; otherwise the W&B files live inside the run directory
        root = Path(os.environ.get("WANDB_DIR") or out / "wandb")
        root.mkdir(parents=True, exist_ok=True)
        id_file = out / "wandb" / _RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        try:
            self.run = wandb.init(
                project=project,
                name=out.name,
                dir=str(root),
                config=config,
                id=run_id,
                resume="allow" if run_id else None,
                mode=os.environ.get("WANDB_MODE") or None,  # online | offline | disabled
            )
        except Exception as e:  # no network and no login, bad project name, ...
            msg = " ".join(str(e).split())[:200]
            raise SnuggleError(
                f"train.report_to: wandb could not start a run ({msg}); WANDB_MODE=offline needs no network"
            ) from None
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run.id)

    def log(self, row: dict[str, Any]) -> None:
        step, scalars = _scalars(row)
        # W&B drops NaN/inf with a warning per value; the JSONL keeps them
        self.run.log({k: v for k, v in scalars.items() if math.isfinite(v)}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_reporters(
    names: list[str], out: Path, project: str, config: dict[str, Any], resume: bool
) -> list[Reporter]:
    """The reporters `train.report_to` names, opened for the run directory `out` (rank 0 only)."""
    opened: list[Reporter] = []
    try:
        for name in names:
            if name == "tensorboard":
                opened.append(TensorBoardReporter(out / "tensorboard"))
            elif name == "wandb":
                opened.append(WandbReporter(out, project, config, resume))
    except BaseException:
        for r in opened:
            r.close()
        raise
    return opened
