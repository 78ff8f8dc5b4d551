"""Rebuild a trained model from a run directory (its config.yaml and latest checkpoint) or an adapter."""

from __future__ import annotations

import warnings
from pathlib import Path

from snuggle.config import RunConfig, load_config
from snuggle.errors import SnuggleError
from snuggle.load import load
from snuggle.model.decoder import Decoder
from snuggle.train.checkpoint import load_trainables
from snuggle.train.setup import build_model, check_run_shapes, check_tokenizer_fits, run_checkpoint

__all__ = ["load_run", "load_with_adapter", "is_run_dir", "run_config"]


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file()


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


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def load_run(
    run_dir: str | Path,
    device: str | None = None,
    model_path: str | Path | None = None,
    dtype: str | None = None,
) -> tuple[Decoder, object, RunConfig]:
    """The run's model with its latest trainables. `model_path` replaces the base the run recorded (the
    same model elsewhere, on another machine): the checkpoint's shapes must fit it, or the error names
    both models. `dtype` replaces the run's model.dtype (None keeps it)."""
    run = Path(run_dir)
    cfg = run_config(run)
    ckpt = run_checkpoint(run)
    if device is not None:
        cfg.model.device = device
    if dtype is not None:
        cfg.model.dtype = dtype
    if model_path is not None:
        cfg.model.path = str(model_path)
    # the checkpoint holds every trainable tensor, so a second-stage run's starting adapter is not read
    # (it need not even exist any more)
    model, tokenizer = build_model(cfg, load_adapter=False)
    check_run_shapes(ckpt, model, f"run {run}")
    load_trainables(ckpt, model)
    model.eval()
    return model, tokenizer, cfg


def load_with_adapter(model_path: str, adapter: str | None, dtype=None, device=None):
    """`--model PATH [--adapter DIR]`: DIR is a snuggle run directory or a PEFT LoRA adapter directory.

    `dtype` None is "auto", except with a run directory, whose own model.dtype it then keeps.

    An adapter must fit the model: a different base (hidden size, layers, vocabulary, any tensor's shape)
    is an error naming both. A differing recorded base path alone is a warning: paths differ between
    machines, and the same model may live anywhere.
    """
    if adapter is None:
        model, tokenizer = load(model_path, dtype=dtype, device=device)
        check_tokenizer_fits(tokenizer, model, f"--model {model_path}")
        return model, tokenizer
    a = Path(adapter)
    if is_run_dir(a):
        recorded = run_config(a).model.path
        model, tokenizer, _ = load_run(a, device=device, model_path=model_path, dtype=dtype)
        if not _same_path(recorded, model_path):
            warnings.warn(
                f"run {a} was trained on {recorded}, not on --model {model_path}; the shapes fit, so it "
                "is used: make sure it is the same base model",
                stacklevel=2,
            )
        return model, tokenizer
    if (a / "adapter_config.json").is_file():
        from snuggle.io.peft_format import load_peft_adapter, peft_lora_settings

        model, tokenizer = load(model_path, dtype=dtype, device=device)
        check_tokenizer_fits(tokenizer, model, f"--model {model_path}")
        load_peft_adapter(model, a)
        model.eval()
        base = peft_lora_settings(a)["base"]
        if base and Path(base).expanduser().exists() and not _same_path(base, model_path):
            warnings.warn(
                f"adapter {a} was trained on {base}, not on --model {model_path}; the shapes fit, so it "
                "is used: make sure it is the same base model",
                stacklevel=2,
            )
        return model, tokenizer
    raise SnuggleError(f"{a}: not a run directory (config.yaml) nor a PEFT adapter (adapter_config.json)")
