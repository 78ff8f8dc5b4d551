"""Rebuild a trained model from a run directory (its config.yaml and latest checkpoint) or an adapter."""

from __future__ import annotations

from pathlib import Path

import yaml

from snuggle.config import RunConfig, config_from_dict
from snuggle.errors import SnuggleError
from snuggle.load import load
from snuggle.model.decoder import Decoder
from snuggle.train.checkpoint import latest_checkpoint, load_trainables
from snuggle.train.setup import build_model

__all__ = ["load_run", "load_with_adapter", "is_run_dir", "run_config"]


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file()


def run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run saved (`<run>/config.yaml`)."""
    run = Path(run_dir)
    if not is_run_dir(run):
        raise SnuggleError(f"{run}: not a snuggle run directory (no config.yaml)")
    try:
        tree = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SnuggleError(f"{run}/config.yaml: unreadable run config ({e})") from None
    return config_from_dict(tree or {})


def load_run(run_dir: str | Path, device: str | None = None) -> tuple[Decoder, object, RunConfig]:
    run = Path(run_dir)
    cfg = run_config(run)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise SnuggleError(f"{run}: the run has no complete checkpoint yet")
    if device is not None:
        cfg.model.device = device
    # the checkpoint holds every trainable tensor, so a second-stage run's starting adapter is not read
    # (it need not even exist any more)
    model, tokenizer = build_model(cfg, load_adapter=False)
    load_trainables(ckpt, model)
    model.eval()
    return model, tokenizer, cfg


def load_with_adapter(model_path: str, adapter: str | None, dtype=None, device=None):
    """`--model PATH [--adapter DIR]`: DIR is a snuggle run directory or a PEFT LoRA adapter directory."""
    if adapter is None:
        return load(model_path, dtype=dtype, device=device)
    a = Path(adapter)
    if is_run_dir(a):
        model, tokenizer, cfg = load_run(a, device=device)
        if Path(cfg.model.path).resolve() != Path(model_path).resolve():
            # a run's adapter only means something on the base it was trained on
            raise SnuggleError(f"run {a} was trained on {cfg.model.path}, not on --model {model_path}")
        return model, tokenizer
    if (a / "adapter_config.json").is_file():
        from snuggle.io.peft_format import load_peft_adapter

        model, tokenizer = load(model_path, dtype=dtype, device=device)
        load_peft_adapter(model, a)
        model.eval()
        return model, tokenizer
    raise SnuggleError(f"{a}: not a run directory (config.yaml) nor a PEFT adapter (adapter_config.json)")
