"""Trained LoRA factors onto a freshly loaded base model: from a snuggle run or a PEFT adapter directory.

One path for every caller (a second training stage's `model.adapter`, eval's and generate's
`--adapter`): the adapter's kind is found once, its LoRA settings checked once against the config's
(when a config asks for them), its shapes against the model, and a base recorded under another path is
one warning: paths differ between machines, and the same model may live anywhere.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from snuggle.config import LoraConfig
from snuggle.errors import SnuggleError
from snuggle.lora import LoRALinear, apply_lora, resolve_targets
from snuggle.model.decoder import Decoder
from snuggle.run_dir import check_run_shapes, is_run_dir, run_checkpoint, run_config, same_path
from snuggle.train.checkpoint import load_trainables

__all__ = ["adapter_kind", "attach_adapter", "warn_other_base"]


def adapter_kind(adapter: Path, key: str) -> str:
    """ "run" (a snuggle run directory) or "peft" (a PEFT LoRA adapter directory); else an error naming
    `key`, the config key or flag that gave the path."""
    from snuggle.io.peft_format import ADAPTER_CONFIG

    if is_run_dir(adapter):
        return "run"
    if (adapter / ADAPTER_CONFIG).is_file():
        return "peft"
    if not adapter.exists():
        raise SnuggleError(f"{key} not found: {adapter}")
    # the config's wording and the command line's, as they always read (scripts may match them)
    run = "snuggle run directory" if key == "model.adapter" else "run directory"
    raise SnuggleError(f"{key} {adapter}: not a {run} (config.yaml) nor a PEFT adapter ({ADAPTER_CONFIG})")


def _structure(lc: LoraConfig) -> dict[str, Any]:
    """The LoRA settings that shape the factors (dropout does not: a stage may train with its own)."""
    return {
        "r": lc.r,
        "alpha": float(lc.alpha),
        "rslora": bool(lc.rslora),
        "targets": tuple(resolve_targets(lc.targets)),
        "train_embeddings": bool(lc.train_embeddings),
    }


def _check_settings(want: LoraConfig, have: dict[str, Any], adapter: Path) -> None:
    """Error naming every structural LoRA setting in which the config differs from the adapter's."""
    diff = []
    for key, value in _structure(want).items():
        theirs = have[key]
        if key == "targets":
            same = set(value) == set(theirs)
            value, theirs = list(value), list(theirs)
        else:
            same = value == theirs
        if not same:
            diff.append(f"lora.{key}={value} (adapter: {theirs})")
    if diff:
        raise SnuggleError(
            f"lora settings differ from model.adapter {adapter}: {', '.join(diff)}; set them to the adapter's"
        )


def warn_other_base(label: str, recorded: str | None, base_key: str, base: str) -> None:
    """A warning when the adapter was recorded as trained on another path than the base it fits."""
    if recorded is not None and not same_path(recorded, base):
        warnings.warn(
            f"{label} was trained on {recorded}, not on {base_key} {base}; the shapes fit, so it is used: "
            "make sure it is the same base model",
            stacklevel=3,
        )


def attach_adapter(
    model: Decoder,
    adapter: Path,
    base: str,
    lora: LoraConfig | None = None,
    key: str = "model.adapter",
    base_key: str = "model.path",
) -> None:
    """LoRA (and trained embeddings) onto `model`, a fresh base loaded from `base`, with the factors of
    `adapter`: a snuggle LoRA run's latest checkpoint or a PEFT adapter directory.

    `lora`: the settings a new stage trains with, which must be the adapter's structurally (r, alpha,
    rslora, targets, train_embeddings); its dropout replaces the adapter's. None takes the adapter's own.
    `key` and `base_key` name where the two paths came from (a config key or a flag) in errors and the
    warning; without a `lora` the warning names the adapter by its kind, "run" or "adapter".
    """
    kind = adapter_kind(adapter, key)
    label = f"{key} {adapter}" if lora is not None else f"{'run' if kind == 'run' else 'adapter'} {adapter}"
    if kind == "run":
        run_cfg = run_config(adapter)
        if not run_cfg.use_lora:
            raise SnuggleError(
                f"{key} {adapter} is a full fine-tuning run, not an adapter; export it with "
                f"`snuggle export {adapter} --format hf` and give that directory as model.path"
            )
        if lora is not None:
            _check_settings(lora, _structure(run_cfg.lora), adapter)
        ckpt = run_checkpoint(adapter)
        check_run_shapes(ckpt, model, label)
        warn_other_base(label, run_cfg.model.path, base_key, base)
        apply_lora(model, lora or run_cfg.lora)
        load_trainables(ckpt, model)
        return
    from snuggle.io.peft_format import load_peft_adapter, peft_lora_settings

    have = peft_lora_settings(adapter)
    if lora is not None:
        _check_settings(lora, have, adapter)
    load_peft_adapter(model, adapter)  # the shapes: a different base model is refused here, named
    # a hub id names no local path, and a local path differs between machines: the name alone is a hint
    recorded = have["base"] if have["base"] and Path(have["base"]).expanduser().exists() else None
    warn_other_base(label, recorded, base_key, base)
    if lora is not None:  # the adapter's lora_dropout was its own training's; this stage trains with ours
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.dropout = nn.Dropout(lora.dropout) if lora.dropout > 0 else nn.Identity()
