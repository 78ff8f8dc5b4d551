"""Hugging Face checkpoint directories: config.json, one or sharded safetensors, tokenizer; read and write.

Reading yields one tensor at a time (safetensors memory-maps the file), so a model built on the meta
device is filled without ever holding its weights twice. `hf_tensor_index` gives the same tensors by
name, each read when asked for, in any order (FSDP's sharded load reads one decoder block at a time).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from snuggle.data.sources import plain_name
from snuggle.errors import SnuggleError

__all__ = [
    "read_hf_config",
    "iter_hf_tensors",
    "hf_tensor_index",
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


def _read_json(f: Path, what: str) -> Any:
    """A JSON file from a model directory; every failure (unreadable, not UTF-8, malformed, 5000-digit
    numbers, nesting too deep) is one line naming it."""
    try:
        return json.loads(f.read_bytes())
    except OSError as e:
        raise SnuggleError(f"{f}: unreadable {what} ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integer-digit limits
        raise SnuggleError(f"{f}: unreadable {what} ({' '.join(str(e).split())[:160]})") from None
    except RecursionError:
        raise SnuggleError(f"{f}: unreadable {what} (JSON nested too deeply)") from None


def read_hf_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SnuggleError(f"{path}: not a model directory (no config.json)")
    cfg = _read_json(cfg_file, "config")
    if not isinstance(cfg, dict):
        raise SnuggleError(
            f"{cfg_file}: unreadable config (a JSON object expected, got {type(cfg).__name__})"
        )
    for key in _SIZES:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= _MAX_SIZE):
            raise SnuggleError(
                f"{cfg_file}: {key} = {str(v)[:40]} is not a plausible size (1 to {_MAX_SIZE})"
            )
    for key, (kinds, want) in _TYPES.items():
        v = cfg.get(key)
        if v is None:
            continue
        if not isinstance(v, kinds) or (kinds is _NUMBER and (isinstance(v, bool) or not math.isfinite(v))):
            raise SnuggleError(f"{cfg_file}: {key} must be {want}, got {str(v)[:40]}")
    _check_layer_count(path, cfg, cfg_file)
    return cfg


# config.json values that size the model: the decoder is built from them before a single weight is read,
# so a corrupt 10**9 layers would hang there instead of failing on the missing tensors
_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
)
_MAX_SIZE = 2**31 - 1
_NUMBER = (int, float)
# the other values the model is built from, by type (None means absent everywhere)
_TYPES: dict[str, tuple[Any, str]] = {
    "model_type": (str, "a string"),
    "architectures": (list, "a list of class names"),
    "rope_scaling": (dict, "a mapping"),
    "rope_parameters": (dict, "a mapping"),
    "rope_theta": (_NUMBER, "a finite number"),
    "rms_norm_eps": (_NUMBER, "a finite number"),
    "sliding_window": (int, "an integer"),
    "tie_word_embeddings": (bool, "true or false"),
    "attention_bias": (bool, "true or false"),
    "mlp_bias": (bool, "true or false"),
    "use_sliding_window": (bool, "true or false"),
}
_LAYER_NAME = re.compile(r"model\.layers\.([0-9]{1,9})\.")


def _check_layer_count(path: Path, cfg: dict[str, Any], cfg_file: Path) -> None:
    """num_hidden_layers must match the layers the weights hold (read from the safetensors headers, which
    costs a few kB): a directory without weights is left to the weight reader to report."""
    layers = cfg.get("num_hidden_layers")
    if layers is None:
        return
    try:
        files = _weight_files(path)
    except SnuggleError:
        return  # no weights (or an unreadable index): iter_hf_tensors says so when weights are read
    found: set[int] = set()
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
        except (OSError, SafetensorError) as e:
            raise SnuggleError(f"{f}: unreadable safetensors file ({e})") from None
        found.update(int(m.group(1)) for k in keys if (m := _LAYER_NAME.match(k)))
    if found and len(found) < layers:
        raise SnuggleError(
            f"{cfg_file}: num_hidden_layers is {layers}, but the weights hold {len(found)} layers"
        )


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        tree = _read_json(index, "shard index")
        weight_map = tree.get("weight_map") if isinstance(tree, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise SnuggleError(f"{index}: unreadable shard index (no weight_map of tensor -> file)")
        # a shard is a file directly in the model directory: the index is input, and a name like
        # '../../x' or '/etc/x' must not make us open files elsewhere
        names = sorted({plain_name(n, str(index), "shard") for n in weight_map.values()})
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


def _open_weights(f: Path):
    try:
        return safe_open(str(f), framework="pt")
    except (OSError, SafetensorError) as e:
        raise SnuggleError(f"{f}: unreadable safetensors file ({e})") from None


def _get_tensor(st, f: Path, name: str) -> torch.Tensor:
    try:
        return st.get_tensor(name)
    except (OSError, SafetensorError) as e:
        raise SnuggleError(f"{f}: unreadable tensor {name} ({e})") from None


def iter_hf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for f in _weight_files(path):
        st = _open_weights(f)
        for name in list(st.keys()):
            yield name, _get_tensor(st, f, name)


def _read_one(f: Path, name: str) -> torch.Tensor:
    # the file is opened for this one tensor: what it returns is backed by the file's memory map, and
    # once the caller drops it nothing of the file stays mapped (no resident pages accumulate over a
    # 100 GB checkpoint read block by block)
    with _open_weights(f) as st:
        return _get_tensor(st, f, name)


def hf_tensor_index(path: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """Every tensor of the checkpoint by name -> a function that reads it (only the headers are read here).

    Names in the order `iter_hf_tensors` yields them; each tensor is read when its function is called,
    so a caller can take them in any order and hold only those it still needs.
    """
    index: dict[str, Callable[[], torch.Tensor]] = {}
    for f in _weight_files(path):
        with _open_weights(f) as st:
            names = list(st.keys())
        for name in names:
            index[name] = functools.partial(_read_one, f, name)
    return index


def load_hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        # trust_remote_code=False: a tokenizer_config.json naming its own Python class (auto_map) is
        # refused, never imported; local_files_only: nothing is fetched from a hub
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers and tokenizers raise a zoo of types for bad tokenizer files
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise SnuggleError(f"{path}: no usable tokenizer ({msg})") from None
    check_chat_template_names(tok, path)
    return tok


def check_chat_template_names(tokenizer: Any, where: Path | str) -> None:
    """Named chat templates become files `<name>.jinja` when the tokenizer is saved (export): a name from
    tokenizer_config.json like '../../x' must not write outside the export directory."""
    templates = getattr(tokenizer, "chat_template", None)
    if not isinstance(templates, dict):
        return
    for name in templates:
        if (
            not isinstance(name, str)
            or not name
            or name.startswith(".")
            or any(c in name for c in "/\\\x00:")
            or Path(name).is_absolute()
        ):
            raise SnuggleError(f"{where}: chat template name {name!r} is not a plain name")


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, then the mode any file we write gets (0666 less the umask): safetensors
    0.8 writes through a private temp file, which would leave an exported model readable by its owner
    only, unlike the config and tokenizer beside it."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def copy_generation_config(base: Path, out: Path) -> None:
    """The base's generation_config.json (sampling defaults, EOS ids) into an export, as transformers'
    save_pretrained would keep it; a file that is not a JSON object is left behind (it is input)."""
    src = base / "generation_config.json"
    if not base.is_dir() or not src.is_file():
        return
    try:
        obj = json.loads(src.read_text())
    except (OSError, ValueError):
        return
    if isinstance(obj, dict):
        write_json_atomic(out / "generation_config.json", obj)


def save_hf_checkpoint(
    state: dict[str, torch.Tensor],
    hf_config: dict[str, Any],
    out: Path,
    tokenizer=None,
    max_shard_bytes: int = 5 << 30,
) -> None:
    """Write config.json, model(-0000k-of-0000n).safetensors (+ index) and the tokenizer into `out`."""
    if tokenizer is not None:
        check_chat_template_names(tokenizer, "the tokenizer")  # its names become file names: before writing
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
        save_safetensors(shards[0], out / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, out / fname)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in state.values())
        write_json_atomic(
            out / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    cfg = dict(hf_config)
    if all(t.is_floating_point() for t in state.values()):
        # dense weights (a bitsandbytes 4-bit base is exported dequantized): a quantization_config kept
        # from the source would have transformers build 4-bit layers around them, which then fail
        cfg.pop("quantization_config", None)
    cfg.setdefault("architectures", [_ARCH_NAMES.get(cfg.get("model_type"), "LlamaForCausalLM")])
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    cfg["torch_dtype"] = dtype
    cfg["dtype"] = dtype
    write_json_atomic(out / "config.json", cfg)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
