"""PEFT-format LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`) and merged exports.

Our parameter names are Hugging Face's, and PEFT names a LoRA factor of `model.layers.0.self_attn.q_proj`
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (the adapter name stripped, as
`get_peft_model_state_dict` does), so the mapping is a prefix plus `.weight`. Trained embeddings travel
as PEFT `modules_to_save`, whose saved keys are the plain module keys (`base_model.model.lm_head.weight`).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from snuggle.config import LoraConfig
from snuggle.errors import SnuggleError
from snuggle.io.hf import save_safetensors, write_json_atomic
from snuggle.lora import ALL_LINEAR, LoRALinear, apply_lora
from snuggle.model.decoder import Decoder
from snuggle.quant.base import QuantizedWeight

__all__ = [
    "save_peft_adapter",
    "load_peft_adapter",
    "peft_lora_settings",
    "merged_state_dict",
    "check_base_shape",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# our embedding parameter -> PEFT's modules_to_save entry
_EMBEDDINGS = {"model.embed_tokens.weight": "embed_tokens", "lm_head.weight": "lm_head"}


def _lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _one(values: set, what: str) -> Any:
    if len(values) != 1:
        raise SnuggleError(f"the model's LoRA layers disagree on {what} ({sorted(values)}); cannot export")
    return next(iter(values))


def save_peft_adapter(model: Decoder, lora_cfg: LoraConfig, base_model_path: str, out: Path) -> None:
    """Write the model's LoRA factors (and trained embeddings) to `out` as a PEFT LoRA adapter.

    `peft.PeftModel.from_pretrained(base, out)` then reproduces the model. With tied embeddings both
    embed_tokens and lm_head are written (same values), because PEFT wraps each module separately.
    """
    loras = _lora_modules(model)
    if not loras:
        raise SnuggleError("the model has no LoRA layers to save as an adapter (was apply_lora called?)")
    # the modules are what the weights were trained with; a config that disagrees is a caller's bug
    r = _one({m.r for m in loras.values()}, "r")
    alpha = _one({m.alpha for m in loras.values()}, "alpha")
    rslora = _one({m.rslora for m in loras.values()}, "rslora")
    if (lora_cfg.r, float(lora_cfg.alpha), bool(lora_cfg.rslora)) != (r, float(alpha), bool(rslora)):
        raise SnuggleError(
            f"lora config (r={lora_cfg.r}, alpha={lora_cfg.alpha}, rslora={lora_cfg.rslora}) does not match "
            f"the model's LoRA layers (r={r}, alpha={alpha}, rslora={rslora})"
        )
    leaf_names = {name.rpartition(".")[2] for name in loras}
    targets = [t for t in ALL_LINEAR if t in leaf_names]

    tensors: dict[str, torch.Tensor] = {}
    for name, m in loras.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().float().contiguous().cpu()
    modules_to_save = None
    # trainable embeddings mean they were trained, whatever the config passed here says (a model that
    # came back through load_peft_adapter has them trainable too)
    if lora_cfg.train_embeddings or model.model.embed_tokens.weight.requires_grad:
        modules_to_save = list(_EMBEDDINGS.values())
        params = dict(model.named_parameters(remove_duplicate=False))
        for ours in _EMBEDDINGS:
            # clone: safetensors refuses two keys sharing one storage (the tied pair)
            tensors[_PREFIX + ours] = params[ours].detach().float().cpu().clone()

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "lora_dropout": float(lora_cfg.dropout),
        "target_modules": targets,
        "modules_to_save": modules_to_save,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (ADAPTER_WEIGHTS + ".tmp")
    save_safetensors(tensors, tmp)
    os.replace(tmp, out / ADAPTER_WEIGHTS)
    # config last, so a reader that finds the config in a new directory also finds the weights
    write_json_atomic(out / ADAPTER_CONFIG, config)


def _read_config(cfg_file: Path) -> dict[str, Any]:
    """adapter_config.json, with the values snuggle uses checked for type and range: it is input, and a
    wrong type would otherwise surface as a traceback deep in apply_lora (or an r of 0, an alpha of NaN,
    as a silently broken model)."""
    try:
        cfg = json.loads(cfg_file.read_bytes())
    except OSError as e:
        raise SnuggleError(f"{cfg_file}: unreadable adapter config ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # malformed JSON, not UTF-8, absurd numbers, deep nesting
        msg = " ".join(str(e).split())[:160] or type(e).__name__
        raise SnuggleError(f"{cfg_file}: unreadable adapter config ({msg})") from None
    if not isinstance(cfg, dict):
        raise SnuggleError(f"{cfg_file}: unreadable adapter config (a JSON object expected)")

    def number(key: str, ok, want: str, default: Any = None) -> None:
        v = cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not ok(v):
            raise SnuggleError(f"{cfg_file}: {key} must be {want}, got {str(v)[:40]!r}")

    number("r", lambda v: isinstance(v, int) and 1 <= v <= 1 << 20, "an integer >= 1")
    number("lora_alpha", lambda v: v > 0, "a number > 0")
    if cfg.get("lora_dropout") is not None:
        number("lora_dropout", lambda v: 0 <= v < 1, "a number in [0, 1)")
    mts = cfg.get("modules_to_save")
    if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) for m in mts)):
        raise SnuggleError(f"{cfg_file}: modules_to_save must be a list of module names or null")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise SnuggleError(f"{cfg_file}: base_model_name_or_path must be a string or null")
    return cfg


def _read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg_file, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        raise SnuggleError(f"{adapter_dir}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    cfg = _read_config(cfg_file)
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise SnuggleError(
                f"{adapter_dir}: only a pickled adapter_model.bin found; snuggle loads safetensors"
            )
        raise SnuggleError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    try:
        with safe_open(str(weights), framework="pt") as st:
            tensors = {k: st.get_tensor(k) for k in st.keys()}
    except (OSError, SafetensorError) as e:
        raise SnuggleError(f"{weights}: unreadable safetensors file ({e})") from None
    return cfg, tensors


def _check_supported(cfg: dict[str, Any], where: Path) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise SnuggleError(f"{where}: adapter type {cfg.get('peft_type')!r} is not supported (LoRA only)")
    unsupported = {
        "use_dora": bool(cfg.get("use_dora")),
        "bias": cfg.get("bias", "none") != "none",
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "trainable_token_indices": bool(cfg.get("trainable_token_indices")),
        "target_parameters": bool(cfg.get("target_parameters")),
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
        "lora_bias": bool(cfg.get("lora_bias")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise SnuggleError(f"{where}: adapter uses unsupported PEFT option(s): {', '.join(bad)}")
    extra = set(cfg.get("modules_to_save") or ()) - set(_EMBEDDINGS.values())
    if extra:
        raise SnuggleError(
            f"{where}: modules_to_save {sorted(extra)} not supported (embed_tokens, lm_head only)"
        )


# PEFT saves `<module>.lora_A.weight`; some older or hand-made adapters keep the adapter name
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight")


def _split_keys(tensors: dict[str, torch.Tensor], where: Path):
    """-> ({module: {"A": t, "B": t}}, {our embedding name: t}); errors name the first key we cannot place."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    emb: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key.removeprefix(_PREFIX)
        if name in _EMBEDDINGS:
            emb[name] = t
        elif module := next(
            (m for k, m in _EMBEDDINGS.items() if name.startswith(k.removesuffix("weight"))), None
        ):
            # PEFT's LoRA on an embedding or lm_head (or its base_layer copy): snuggle trains those as
            # full copies instead, so say that rather than call the tensor unknown
            raise SnuggleError(
                f"{where}: adapter has LoRA on {module} ({key!r}); snuggle supports LoRA on the block "
                "projections, and embed_tokens / lm_head as full copies "
                "(PEFT modules_to_save; lora.train_embeddings)"
            )
        elif m := _LORA_KEY.fullmatch(name):
            lora.setdefault(m["module"], {})[m["part"]] = t
        else:
            raise SnuggleError(
                f"{where}: adapter tensor {key!r} is not a LoRA factor or embedding snuggle supports"
            )
    for module, ab in lora.items():
        if set(ab) != {"A", "B"}:
            raise SnuggleError(f"{where}: adapter has lora_A without lora_B (or the reverse) for {module}")
    return lora, emb


def peft_lora_settings(adapter_dir: Path) -> dict[str, Any]:
    """What LoRA an adapter directory describes, without loading its tensors (names only):
    r, alpha, rslora, targets (in ALL_LINEAR order), train_embeddings, base (base_model_name_or_path)."""
    adapter_dir = Path(adapter_dir)
    cfg_file, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    cfg = _read_config(cfg_file)
    try:
        with safe_open(str(weights), framework="pt") as st:
            keys = list(st.keys())
    except (OSError, SafetensorError) as e:
        raise SnuggleError(f"{adapter_dir}: unreadable PEFT adapter ({e})") from None
    _check_supported(cfg, adapter_dir)
    leaves, emb = set(), False
    for key in keys:
        name = key.removeprefix(_PREFIX)
        if name in _EMBEDDINGS:
            emb = True
        elif m := _LORA_KEY.fullmatch(name):
            leaves.add(m["module"].rpartition(".")[2])
    try:
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise SnuggleError(f"{cfg_file}: missing or bad value for {e}") from None
    return {
        "r": r,
        "alpha": alpha,
        "rslora": bool(cfg.get("use_rslora", False)),
        "targets": tuple(t for t in ALL_LINEAR if t in leaves),
        "train_embeddings": emb,
        "base": cfg.get("base_model_name_or_path"),
    }


_LAYER = re.compile(r"(?:^|\.)layers\.([0-9]{1,6})\.")
_FACTOR = re.compile(r"\.(?P<proj>[a-z_]+_proj)\.lora_(?P<part>[AB])\b")
_HIDDEN_IN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # lora_A is (r, hidden)
_HIDDEN_OUT = ("o_proj", "down_proj")  # lora_B is (hidden, r)


def base_shape_of(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """What the shapes of adapter or checkpoint tensors tell of the base model they were trained on:
    `hidden` size, `layers` (one past the highest layer index) and `vocab` (embedding rows), as known.

    Names are HF names with `lora_A`/`lora_B` (a snuggle checkpoint) or `lora_A.weight` (PEFT)."""
    out: dict[str, int] = {}
    top = -1
    for name, shape in shapes.items():
        if m := _LAYER.search(name):
            top = max(top, int(m.group(1)))
        if len(shape) != 2:
            continue
        if m := _FACTOR.search(name):
            if m["part"] == "A" and m["proj"] in _HIDDEN_IN:
                out.setdefault("hidden", shape[1])
            elif m["part"] == "B" and m["proj"] in _HIDDEN_OUT:
                out.setdefault("hidden", shape[0])
        elif name.endswith(tuple(_EMBEDDINGS)):
            out["vocab"] = shape[0]
            out.setdefault("hidden", shape[1])
    if top >= 0:
        out["layers"] = top + 1
    return out


def _describe(d: dict[str, int]) -> str:
    parts = []
    if "hidden" in d:
        parts.append(f"hidden {d['hidden']}")
    if "layers" in d:
        parts.append(f"{d['layers']} layers")
    if "vocab" in d:
        parts.append(f"vocabulary {d['vocab']}")
    return ", ".join(parts)


def check_base_shape(
    shapes: dict[str, tuple[int, ...]], model: Decoder, what: str, every_layer: bool = True
) -> None:
    """Refuse trained tensors (by name -> shape) whose base model differs from `model` in hidden size,
    vocabulary or layer count, naming both: "adapter X was trained on a model with hidden 576, 30 layers;
    this model has hidden 64, 2 layers". `every_layer`: the tensors cover every layer (a snuggle run, a
    PEFT adapter with a target list and no layer selection), so fewer layers is a mismatch too."""
    have = base_shape_of(shapes)
    ours = {"hidden": model.args.hidden_size, "layers": model.args.num_layers, "vocab": model.args.vocab_size}
    differ = [k for k in ("hidden", "vocab") if k in have and have[k] != ours[k]]
    if "layers" in have and (
        have["layers"] > ours["layers"] or (every_layer and have["layers"] < ours["layers"])
    ):
        differ.append("layers")
    if differ:
        mine = {k: ours[k] for k in have}
        raise SnuggleError(
            f"{what} was trained on a different base model: a model with {_describe(have)}; "
            f"this model has {_describe(mine)}"
        )


def load_peft_adapter(model: Decoder, adapter_dir: Path) -> Decoder:
    """Apply a PEFT LoRA adapter directory onto a freshly loaded `model` (in place); returns the model.

    Accepts adapters written by `save_peft_adapter` or by PEFT for the projections we support
    (q/k/v/o/gate/up/down) plus embed_tokens/lm_head as modules_to_save. Everything is checked against
    the model before anything is changed, so a mismatched adapter leaves the model as it was.
    """
    adapter_dir = Path(adapter_dir)
    if _lora_modules(model):
        raise SnuggleError("the model already has LoRA layers; load the adapter onto a fresh base model")
    cfg, tensors = _read_adapter(adapter_dir)
    _check_supported(cfg, adapter_dir)
    lora, emb = _split_keys(tensors, adapter_dir)
    if not lora:
        raise SnuggleError(f"{adapter_dir}: the adapter holds no LoRA factors")
    try:
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise SnuggleError(f"{adapter_dir}/{ADAPTER_CONFIG}: missing or bad value for {e}") from None

    def mismatch(detail: str) -> SnuggleError:
        return SnuggleError(f"adapter {adapter_dir} was trained on a different base model: {detail}")

    # the base as a whole first (hidden size, layer count, vocabulary), whatever the recorded base name
    # says: one line naming both models beats the first of many tensors that do not fit
    every_layer = (
        isinstance(cfg.get("target_modules"), list)
        and cfg.get("layers_to_transform") is None
        and not cfg.get("layers_pattern")
        and not cfg.get("exclude_modules")
    )
    shapes = {k.removeprefix(_PREFIX): tuple(t.shape) for k, t in tensors.items()}
    check_base_shape(shapes, model, f"adapter {adapter_dir}", every_layer=every_layer)

    # validate every shape before touching the model. The targets come from the tensors, not from
    # target_modules, which PEFT also allows as a regex or 'all-linear'.
    targets: set[str] = set()
    for module, ab in lora.items():
        leaf = module.rpartition(".")[2]
        if leaf not in ALL_LINEAR:
            raise SnuggleError(
                f"{adapter_dir}: LoRA on {module!r} is not supported (targets: {list(ALL_LINEAR)})"
            )
        try:
            base = model.get_submodule(module)
        except AttributeError:
            raise mismatch(f"the model has no module {module}") from None
        want_a, want_b = (r, base.in_features), (base.out_features, r)
        if tuple(ab["A"].shape) != want_a or tuple(ab["B"].shape) != want_b:
            raise mismatch(
                f"{module} lora_A/lora_B have shapes {tuple(ab['A'].shape)}/{tuple(ab['B'].shape)}, "
                f"this model expects {want_a}/{want_b} for r={r}"
            )
        targets.add(leaf)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, t in emb.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise mismatch(
                f"{name} has shape {tuple(t.shape)}, this model expects {tuple(params[name].shape)}"
            )
    if emb and model.args.tie_word_embeddings:
        # a module absent from the adapter keeps the base values; a tied model can only hold one matrix
        embed = emb.get("model.embed_tokens.weight", params["model.embed_tokens.weight"])
        head = emb.get("lm_head.weight", params["lm_head.weight"])
        if not torch.equal(embed.to(head.device, torch.float32), head.float()):
            raise SnuggleError(
                f"adapter {adapter_dir} has different embed_tokens and lm_head weights, but the "
                "base model ties them; snuggle keeps tied embeddings tied"
            )

    lc = LoraConfig(
        r=r,
        alpha=alpha,
        dropout=float(cfg.get("lora_dropout") or 0.0),  # checked by _read_config
        rslora=bool(cfg.get("use_rslora", False)),
        targets=[t for t in ALL_LINEAR if t in targets],
        train_embeddings=bool(emb),
    )
    apply_lora(model, lc)
    with torch.no_grad():
        for name, m in _lora_modules(model).items():
            if name in lora:
                m.lora_A.copy_(lora[name]["A"])
                m.lora_B.copy_(lora[name]["B"])
            else:
                # a layer the adapter skipped (PEFT layers_to_transform): B = 0 makes it an exact no-op
                m.lora_B.zero_()
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, t in emb.items():
            params[name].copy_(t)
    return model


def _storage_dtype(model: Decoder) -> torch.dtype:
    # frozen weights keep the checkpoint's dtype; trained copies are fp32 whatever the base was; a
    # quantized base exports in the 16-bit dtype it was quantized from
    for m in model.modules():
        if isinstance(m, QuantizedWeight):
            return m.dtype
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            return p.dtype
    return model.compute_dtype


def merged_state_dict(model: Decoder) -> dict[str, torch.Tensor]:
    """HF-named weights of the model with every LoRA folded in, in the frozen weights' dtype.

    The live model is untouched: merged projections and cast embeddings are new tensors, the other
    weights are returned as detached views (no copy, so exporting a large model needs no second copy).
    lm_head.weight is left out when the embeddings are tied, as HF checkpoints do.
    """
    dtype = _storage_dtype(model)
    loras = _lora_modules(model)
    quant = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedWeight)}
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name == "lm_head.weight" and model.args.tie_word_embeddings:
            continue
        module, _, leaf = name.rpartition(".")
        if module in quant:
            # a quantized weight's parts (qweight, its scales): written once, dequantized, under its own name
            if leaf == "qweight":
                parent = module.rpartition(".")[0]
                with torch.no_grad():
                    w = quant[module].dequantize(torch.float32)
                    if parent in loras:
                        w += loras[parent].delta_weight().to(w.device)
                out[module] = w.to(dtype)
            continue
        if module in loras:
            if leaf.startswith("lora_"):
                continue
            if leaf == "weight":
                m = loras[module]
                with torch.no_grad():
                    merged = m.weight.float() + m.delta_weight().to(m.weight.device)
                out[name] = merged.to(dtype)
                continue
        t = t.detach()
        out[name] = t.to(dtype) if t.is_floating_point() else t
    return out
