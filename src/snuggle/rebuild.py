"""Rebuild a trained model for eval, generate and export: from a run directory, or a base plus an adapter.

Above `snuggle.train.setup` (it builds the model a run trained, as training does); the run directory's
format itself is `snuggle.run_dir`.
"""

from __future__ import annotations

from pathlib import Path

from snuggle.config import RunConfig
from snuggle.load import load
from snuggle.model.decoder import Decoder
from snuggle.run_dir import check_run_shapes, run_checkpoint, run_config
from snuggle.train.adapter import adapter_kind, attach_adapter, warn_other_base
from snuggle.train.checkpoint import load_trainables
from snuggle.train.setup import build_model, check_tokenizer_fits

__all__ = ["load_run", "load_with_adapter"]


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
    a = None if adapter is None else Path(adapter)
    if a is not None and adapter_kind(a, "--adapter") == "run":  # a bad path fails before the model loads
        # the whole run as it trained (its LoRA, quantization and kernels, or its full fine-tuning)
        recorded = run_config(a).model.path
        model, tokenizer, _ = load_run(a, device=device, model_path=model_path, dtype=dtype)
        warn_other_base(f"run {a}", recorded, "--model", model_path)
        return model, tokenizer
    model, tokenizer = load(model_path, dtype=dtype, device=device)
    check_tokenizer_fits(tokenizer, model, f"--model {model_path}")
    if a is not None:
        attach_adapter(model, a, model_path, key="--adapter", base_key="--model")
        model.eval()
    return model, tokenizer
