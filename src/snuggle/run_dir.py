"""The run directory's format, read without building anything: its config, its checkpoints, their shapes.

    <run>/
      config.yaml                the resolved config the run trained with
      metrics.jsonl              one row per logged step and evaluation
      latest                     the name of the newest complete checkpoint: the only pointer readers trust
      checkpoint-NNNNNNN/        see snuggle.train.checkpoint (trainable.safetensors, meta.json, ...)

The lowest layer of everything that reads a run (training's resume, a second stage, eval, export): it
imports nothing from `snuggle.train`; rebuilding a model from a run is `snuggle.rebuild`.
"""

from __future__ import annotations

from pathlib import Path

from snuggle.config import RunConfig, load_config
from snuggle.errors import SnuggleError
from snuggle.model.decoder import Decoder

__all__ = [
    "CHECKPOINT_PREFIX",
    "RUN_MARKERS",
    "TRAINABLE_FILE",
    "check_run_shapes",
    "is_run_dir",
    "latest_checkpoint",
    "run_checkpoint",
    "run_config",
    "same_path",
    "stray_checkpoints",
]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINABLE_FILE = "trainable.safetensors"
# files whose presence means a directory already holds a run
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "latest")


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file()


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two user-given paths name the same place (`~` expanded, links and `..` resolved)."""
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run saved (`<run>/config.yaml`), parsed and validated as any config is."""
    run = Path(run_dir)
    if not is_run_dir(run):
        raise SnuggleError(f"{run}: not a snuggle run directory (no config.yaml)")
    f = run / "config.yaml"
    try:
        return load_config(f)
    except SnuggleError as e:
        if str(e).startswith(str(f)):
            raise
        raise SnuggleError(f"{f}: unreadable run config ({e})") from None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, if it is complete (has its meta.json); None when there is none."""
    pointer = run_dir / "latest"
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SnuggleError(f"{pointer}: unreadable checkpoint pointer ({e})") from None
    # the pointer names a checkpoint directory of this run, nothing else: never a path out of it
    if not (name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit()):
        raise SnuggleError(f"{pointer}: names {name[:80]!r}, not a checkpoint inside the run")
    ckpt = run_dir / name
    return ckpt if (ckpt / "meta.json").is_file() else None


def stray_checkpoints(run: Path, lead: str) -> str | None:
    """What to say when `latest` is missing or names no complete checkpoint while complete ones stand."""
    complete = sorted(p.name for p in run.glob(f"{CHECKPOINT_PREFIX}*") if (p / "meta.json").is_file())
    if not complete:
        return None
    latest = run / "latest"
    what = "names no complete checkpoint" if latest.exists() else "is missing"
    return (
        f"{lead}{latest} {what} while {', '.join(complete[-3:])} "
        f"{'is one' if len(complete) == 1 else 'are'}; to use the newest, write its name there "
        f"(echo {complete[-1]} > {latest}); nothing was changed"
    )


def run_checkpoint(run: Path) -> Path:
    """A run's latest complete checkpoint, which must lie inside the run: `latest` is a file in the run
    directory, and a name in it like '../../elsewhere' must not send us reading other directories."""
    try:
        ckpt = latest_checkpoint(run)
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, a NUL in the name
        raise SnuggleError(f"{run}/latest: unreadable checkpoint pointer ({e})") from None
    if ckpt is None:
        raise SnuggleError(stray_checkpoints(run, "") or f"{run}: the run has no complete checkpoint yet")
    if not ckpt.resolve().is_relative_to(run.resolve()) or ckpt.resolve() == run.resolve():
        raise SnuggleError(f"{run}/latest names {ckpt}, which is not a checkpoint inside the run")
    return ckpt


def check_run_shapes(ckpt: Path, model: Decoder, what: str) -> None:
    """The base a run's checkpoint was trained on (its tensor shapes) must be `model`'s: hidden size,
    layers and vocabulary, whatever the run's recorded model.path says (paths differ between machines)."""
    from safetensors import SafetensorError, safe_open

    from snuggle.io.peft_format import check_base_shape

    try:
        with safe_open(str(ckpt / TRAINABLE_FILE), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise SnuggleError(f"{ckpt}: unreadable checkpoint ({e})") from None
    check_base_shape(shapes, model, what, every_layer=True)
