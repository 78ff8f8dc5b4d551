"""Hugging Face checkpoint directories: config.json, one or sharded safetensors, tokenizer; read and write.

Reading yields one tensor at a time (safetensors memory-maps the file), so a model built on the meta
device is filled without ever holding its weights twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from snuggle.errors import SnuggleError

__all__ = [
    "read_hf_config",
    "iter_hf_tensors",
    "load_hf_tokenizer",
    "save_hf_checkpoint",
    "write_json_atomic",
]

_ARCH_NAMES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def read_hf_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SnuggleError(f"{path}: not a model directory (no config.json)")
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnuggleError(f"{cfg_file}: unreadable config ({e})") from None


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise SnuggleError(f"{index}: unreadable shard index ({e})") from None
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SnuggleError(f"{path}: shards named in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise SnuggleError(
                f"{path}: only pickled weights (.bin/.pt) found; snuggle loads safetensors only"
            )
        raise SnuggleError(f"{path}: no *.safetensors weights found")
    return files


def iter_hf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for f in _weight_files(path):
        try:
            st = safe_open(str(f), framework="pt")
            names = list(st.keys())
        except (OSError, SafetensorError) as e:
            raise SnuggleError(f"{f}: unreadable safetensors file ({e})") from None
        for name in names:
            yield name, st.get_tensor(name)


def load_hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise SnuggleError(f"{path}: no usable tokenizer ({str(e).splitlines()[0]})") from None


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_hf_checkpoint(
    state: dict[str, torch.Tensor],
    hf_config: dict[str, Any],
    out: Path,
    tokenizer=None,
    max_shard_bytes: int = 5 << 30,
) -> None:
    """Write config.json, model(-0000k-of-0000n).safetensors (+ index) and the tokenizer into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in state.values())
        write_json_atomic(
            out / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    cfg = dict(hf_config)
    cfg.setdefault("architectures", [_ARCH_NAMES.get(cfg.get("model_type"), "LlamaForCausalLM")])
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    cfg["torch_dtype"] = dtype
    cfg["dtype"] = dtype
    write_json_atomic(out / "config.json", cfg)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
