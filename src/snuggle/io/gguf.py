"""llama.cpp GGUF files: an HF-style config, HF-named torch tensors and the tokenizer, all read offline.

`gguf.GGUFReader` memory-maps the file, so `iter_gguf_tensors` dequantizes one tensor at a time and a
model built on the meta device is filled without the checkpoint ever being resident in float form;
`gguf_tensor_index` gives the same tensors by name, each dequantized when asked for, in any order.
The reference for correctness is transformers' own GGUF loader (`modeling_gguf_pytorch_utils`): the same
names, the same `(out_features, in_features)` layout and the same values.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from snuggle.errors import SnuggleError
from snuggle.io.hf import check_chat_template_names

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TENSOR_TYPES",
    "iter_gguf_tensors",
    "gguf_tensor_index",
    "load_gguf_tokenizer",
    "read_gguf_config",
]

# GGUF `general.architecture` -> (HF model_type, HF class). llama.cpp files Mistral, SmolLM and TinyLlama
# under "llama": it runs them all as plain Llama (Mistral's sliding window included, which it ignores).
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

_Q = GGMLQuantizationType
# The float, legacy and K-quant types: what llama.cpp's usual presets (Q4_K_M, Q8_0, ...) write, all
# dequantized by gguf-py. The IQ*/TQ*/MXFP families are left out on purpose: a clear error beats a path
# nobody has checked against transformers.
SUPPORTED_TENSOR_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    {_Q.F32, _Q.F16, _Q.BF16, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0}
    | {_Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K}
)

_GGUF_MAGIC = b"GGUF"

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Per-block tensors (`blk.{i}.<key>`). The o_proj and MLP biases exist only in llama (attention_bias,
# mlp_bias: llama.cpp's llama loads them as optional tensors), so another family's file holding one is
# refused below instead of silently dropping it.
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_LLAMA_ONLY = {"attn_output.bias", "ffn_gate.bias", "ffn_up.bias", "ffn_down.bias"}
_QK_NORM = {"attn_q_norm.weight", "attn_k_norm.weight"}
_BLOCK_RE = re.compile(r"blk\.([0-9]{1,6})\.(.+)")
# Tensors that are not model weights: rope_freqs is folded into the config (rope_scaling), attn_rot_embd
# is a precomputed rotary table some old converters stored.
_NOT_WEIGHTS = re.compile(r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd(\.weight)?")


def read_gguf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """An HF `config.json`-style dict for the model in the GGUF file at `path`."""
    p, reader = _open(path)
    return _config(p, reader)


def iter_gguf_tensors(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` for every weight, in torch layout, dequantized to `dtype` one at a time.

    The file is opened and validated here (bad input raises now, not at the first `next`); the tensors are
    read lazily from the memory map. Each yielded tensor is a fresh copy the caller may modify.
    """
    p, reader = _open(path)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SnuggleError(f"{p}: GGUF tensors dequantize to a floating dtype, not {dtype!r}")
    cfg = _config(p, reader)  # validates every tensor's name and type before the first one is read
    return _iter_tensors(p, reader, cfg, dtype)


def gguf_tensor_index(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> dict[str, Callable[[], torch.Tensor]]:
    """`hf_name -> a function that dequantizes it to `dtype``, for every weight: `iter_gguf_tensors` in any
    order. The file stays memory-mapped; only the tensors a caller keeps hold memory of their own."""
    p, reader = _open(path)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SnuggleError(f"{p}: GGUF tensors dequantize to a floating dtype, not {dtype!r}")
    return _index(p, reader, _config(p, reader), dtype)


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """A transformers fast tokenizer built offline from the GGUF's tokenizer metadata, chat template kept."""
    p = Path(path)
    _check_magic(p)
    # transformers parses the file with gguf-py's reader too: never hand it a bad header
    arrays, flags = _check_header(p)
    n_tokens = arrays.get("tokenizer.ggml.tokens")
    from transformers import AutoTokenizer

    # transformers prefers a tokenizer.json beside the file over the GGUF's own metadata, so the file is
    # shown to it alone, through a link in an empty directory.
    with tempfile.TemporaryDirectory(prefix="snuggle-gguf-") as tmp:
        link = Path(tmp) / p.name
        try:
            link.symlink_to(p.resolve())
        except OSError:
            shutil.copyfile(p, link)  # filesystems without symlinks
        try:
            # local_files_only: the tokenizer comes entirely from the file's metadata, never from the hub.
            tok = AutoTokenizer.from_pretrained(
                tmp, gguf_file=p.name, local_files_only=True, trust_remote_code=False
            )
        except Exception as e:  # transformers raises a zoo of types for bad or unsupported tokenizer metadata
            raise SnuggleError(
                f"{p}: cannot build a tokenizer from the GGUF metadata ({_brief(e)})"
            ) from None
    check_chat_template_names(tok, p)  # named templates become file names when the tokenizer is saved
    spm = flags.get("tokenizer.ggml.model") == "llama" and flags.get("tokenizer.ggml.add_space_prefix", True)
    _repair_backend(tok, p, n_tokens, spm)
    return tok


def _repair_backend(tok: PreTrainedTokenizerBase, p: Path, n_tokens: int | None, spm: bool) -> None:
    """The repairs transformers' GGUF tokenizers need, made on one serialization of the backend (a
    tokenizer of 100k+ tokens takes a while to write out and build again): stray added tokens dropped
    (`n_tokens` known), SentencePiece's prefix space (`spm`). A backend that refuses its own edited
    serialization is kept as it was, with a warning."""
    import json

    from tokenizers import Tokenizer

    backend = getattr(tok, "_tokenizer", None)
    if backend is None:
        return
    spec = json.loads(backend.to_str())
    changes = []
    if n_tokens is not None:
        stray = _drop_stray_added_tokens(tok, spec, n_tokens)
        if stray:
            changes.append(f"drop invented tokens {stray}")
    if spm and _spm_prefix_space(spec):
        changes.append("give SentencePiece its prefix space")
    if not changes:
        return
    try:
        tok._tokenizer = Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # tokenizers refusing its own serialization: keep the tokenizer as it was
        warnings.warn(f"{p}: could not {' or '.join(changes)} ({_brief(e)})", stacklevel=3)


def _spm_prefix_space(spec: dict[str, Any]) -> bool:
    """SentencePiece's dummy prefix as the model was trained with it, and as llama.cpp applies it, set in
    a backend's serialization `spec`; True when it changed.

    SentencePiece (Llama 2, TinyLlama, Mistral v0.1) and llama.cpp put one "\u2581" before every text,
    whatever it starts with: " the" is "\u2581\u2581the". transformers builds these GGUF tokenizers with
    a `Metaspace(prepend_scheme="first")` pre-tokenizer, which adds none to a text already starting with a
    space: " the" becomes "\u2581the", the same as "the", and a document's leading space is lost. The
    normalizer form of the models' own legacy tokenizer.json (prepend, then spaces to "\u2581") is exact;
    only texts starting with a space, or a text right after a special token (which llama.cpp prefixes
    too), tokenize differently. Tokenizers built otherwise (Gemma's, Phi-3's) are left as they are.
    """
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") or pre.get("type") != "Metaspace" or pre.get("prepend_scheme") == "never":
        return False
    mark = pre.get("replacement", "\u2581")
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": mark},
            {"type": "Replace", "pattern": {"String": " "}, "content": mark},
        ],
    }
    spec["pre_tokenizer"] = None
    return True


def _drop_stray_added_tokens(tok: PreTrainedTokenizerBase, spec: dict[str, Any], n_tokens: int) -> list[str]:
    """Remove from a backend's serialization `spec` the added tokens transformers invents beyond the
    file's vocabulary; returns their contents.

    transformers builds a byte-level GGUF tokenizer as a `GPT2Tokenizer` whose default special tokens add
    `<|endoftext|>` when the vocabulary lacks it (Llama 3's has `<|end_of_text|>` instead): a token with
    id `n_tokens`, one past the model's embedding, produced wherever a text contains that string. The file's
    own tokens (ids below `n_tokens`) are kept; an invented token that is the tokenizer's bos/eos/unk/pad is
    kept too, and the caller's vocabulary check then names the mismatch.
    """
    added = spec.get("added_tokens") or []
    used = {getattr(tok, name, None) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    stray = [a for a in added if a.get("id", -1) >= n_tokens and a.get("content") not in used]
    spec["added_tokens"] = [a for a in added if a not in stray]
    return [a.get("content") for a in stray]


# --- reading ----------------------------------------------------------------------------------------------


def _brief(e: BaseException) -> str:
    # Errors reach the user as one line: collapse whitespace and cap the length of foreign messages.
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:200]}" if msg else type(e).__name__


def _check_magic(p: Path) -> None:
    if not p.is_file():
        raise SnuggleError(f"{p}: no such GGUF file")
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise SnuggleError(f"{p}: cannot read GGUF file ({_brief(e)})") from None
    if head != _GGUF_MAGIC:
        raise SnuggleError(f"{p}: not a GGUF file (starts with {head!r}, expected {_GGUF_MAGIC!r})")


class _Reader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map.

    The reader slices `self.data` once per metadata item (~250k times for a 49k-token vocabulary), and every
    slice of an `np.memmap` pays for memmap bookkeeping: parsing through a plain view is ~3x faster and holds
    less than half the memory. The view still reads the same mapping lazily. If gguf-py ever stops storing
    its map in `self.data`, this property goes unused and the reader merely parses at the old speed.
    """

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain = value.view(np.ndarray)


# --- the header, checked before gguf-py parses it ---------------------------------------------------------
#
# gguf-py's reader trusts the header: an array length of 2**40 over a 28 kB file makes it read empty slices
# past the end forever (a hang that also grows memory), and counts, lengths, dimensions and offsets are used
# as given. `_check_header` walks the same structure with struct over a memory map and checks every count,
# length and offset against the file size before the reader (ours or transformers') ever sees the file.

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType sizes
_STRING, _ARRAY, _UINT32, _BOOL = 8, 9, 4, 7
# metadata the tokenizer fix-up reads before transformers builds the tokenizer (see _spm_prefix_space)
_FLAGS = ("tokenizer.ggml.model", "tokenizer.ggml.add_space_prefix")
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 4  # arrays of arrays: none in practice; bounded so the walk's recursion is too
_HEADER_BYTES = 24  # magic, version, tensor count, metadata count
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
_INT64_MAX = 2**63 - 1
_MAX_SIZE = 2**31 - 1  # hidden sizes, head and layer counts, context lengths: int32, as llama.cpp has them
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class _HeaderWalk:
    def __init__(self, p: Path, buf: mmap.mmap, size: int) -> None:
        self.p, self.buf, self.size, self.pos = p, buf, size, _HEADER_BYTES
        self.array_lengths: dict[str, int] = {}  # top-level array metadata: key -> item count
        self.flags: dict[str, bool | str] = {}  # the _FLAGS keys present: bools and strings

    def bad(self, what: str) -> SnuggleError:
        return SnuggleError(f"{self.p}: truncated or corrupt GGUF file: {what} (file size {self.size} bytes)")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.bad(f"{what} at byte {self.pos} needs {n} bytes, past the end of the file")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def text(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad(f"{what} at byte {self.pos - n} is not UTF-8") from None

    def value(self, kind: int, key: str, depth: int = 0) -> None:
        """Skip one metadata value of type `kind`, checking it lies inside the file."""
        if kind in _SCALAR_SIZES:
            self.need(_SCALAR_SIZES[kind], f"value of {key}")
            self.pos += _SCALAR_SIZES[kind]
        elif kind == _STRING:
            n = self.u64(f"string length of {key}")
            self.need(n, f"string value of {key}")
            self.pos += n
        elif kind == _ARRAY:
            if depth >= _MAX_NESTING:
                raise self.bad(f"{key}: arrays nested more than {_MAX_NESTING} deep")
            item = self.u32(f"array type of {key}")
            count = self.u64(f"array length of {key}")
            if depth == 0:
                self.array_lengths[key] = count
            smallest = _SCALAR_SIZES.get(item, 8 if item == _STRING else 12)
            if item not in _SCALAR_SIZES and item not in (_STRING, _ARRAY):
                raise self.bad(f"{key}: unknown array item type {item}")
            if count > (self.size - self.pos) // smallest:
                raise self.bad(f"{key}: array of {count} items cannot fit in the rest of the file")
            if item in _SCALAR_SIZES:
                self.pos += count * smallest
            elif item == _STRING:
                buf, size, pos, unpack = self.buf, self.size, self.pos, _U64.unpack_from
                for _ in range(count):  # the tokenizer's vocabulary: a tight loop (pos only grows)
                    if pos + 8 > size:
                        break
                    pos += 8 + unpack(buf, pos)[0]
                else:
                    if pos <= size:
                        self.pos = pos
                        return
                raise self.bad(f"{key}: array of {count} strings runs past the end of the file")
            else:
                for _ in range(count):
                    self.value(_ARRAY, key, depth + 1)
        else:
            raise self.bad(f"{key}: unknown value type {kind}")

    def walk(self) -> None:
        version = _U32.unpack_from(self.buf, 4)[0]
        if version & 0xFFFF == 0 and version:
            raise SnuggleError(f"{self.p}: big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise SnuggleError(f"{self.p}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors = _U64.unpack_from(self.buf, 8)[0]
        n_kv = _U64.unpack_from(self.buf, 16)[0]
        room = self.size - _HEADER_BYTES
        if (
            n_kv > room // _MIN_KV_BYTES
            or n_tensors > room // _MIN_TENSOR_BYTES
            or (n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES > room)
        ):
            raise self.bad(f"it declares {n_tensors} tensors and {n_kv} metadata entries, more than fit")
        alignment = 32  # GGUF_DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = self.text(f"metadata key {i}")
            kind = self.u32(f"value type of {key}")
            start = self.pos
            self.value(kind, key)
            if key in _FLAGS and kind in (_BOOL, _STRING):
                raw = self.buf[start : self.pos]
                self.flags[key] = bool(raw[0]) if kind == _BOOL else raw[8:].decode("utf-8", "replace")
            if key == "general.alignment":
                alignment = _U32.unpack_from(self.buf, start)[0] if kind == _UINT32 else 0
                if alignment == 0 or alignment & (alignment - 1):
                    raise self.bad("general.alignment is not a power of two stored as uint32")
        tensors = []
        for i in range(n_tensors):
            name = self.text(f"name of tensor {i}")
            n_dims = self.u32(f"dimension count of {name}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise self.bad(f"tensor {name} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
            dims = [self.u64(f"dimensions of {name}") for _ in range(n_dims)]
            kind = self.u32(f"type of {name}")
            offset = self.u64(f"data offset of {name}")
            if kind not in GGML_QUANT_SIZES:
                raise self.bad(f"tensor {name} has unknown type id {kind}")
            n_elements = math.prod(dims)
            if not all(0 < d <= _INT64_MAX for d in dims) or n_elements > _INT64_MAX:
                raise self.bad(f"tensor {name} has absurd dimensions {dims}")
            block, type_size = GGML_QUANT_SIZES[kind]
            if dims[0] % block:
                raise self.bad(
                    f"tensor {name}: rows of {dims[0]} values are not whole blocks of {block} "
                    f"({GGMLQuantizationType(kind).name})"
                )
            tensors.append((name, offset, n_elements // block * type_size))
        data_start = -(-self.pos // alignment) * alignment
        for name, offset, n_bytes in tensors:
            if data_start + offset + n_bytes > self.size:
                raise self.bad(
                    f"tensor {name}: {n_bytes} bytes at data offset {offset} lie past the end of the file"
                )


def _check_header(p: Path) -> tuple[dict[str, int], dict[str, bool | str]]:
    """Every count, length, dimension and offset of the GGUF header at `p` fits the file (see above).
    Returns the item count of each top-level array (the tokenizer's vocabulary, ...) and the `_FLAGS`."""
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _HEADER_BYTES:
                raise SnuggleError(
                    f"{p}: truncated or corrupt GGUF file ({size} bytes; the header alone is 24)"
                )
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                walk = _HeaderWalk(p, buf, size)
                walk.walk()
        return walk.array_lengths, walk.flags
    except OSError as e:
        raise SnuggleError(f"{p}: cannot read GGUF file ({_brief(e)})") from None


def _open(path: str | os.PathLike[str]) -> tuple[Path, GGUFReader]:
    p = Path(path)
    _check_magic(p)
    _check_header(p)
    try:
        reader = _Reader(p)
    except Exception as e:  # a truncated/corrupt header surfaces as ValueError, IndexError, KeyError, ...
        raise SnuggleError(f"{p}: truncated or corrupt GGUF file ({_brief(e)})") from None
    if reader.byte_order != "I":
        # gguf-py's dequantizers assume host byte order inside quant blocks.
        raise SnuggleError(f"{p}: big-endian GGUF files are not supported")
    return p, reader


def _value(reader: GGUFReader, key: str, p: Path) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception as e:
        raise SnuggleError(f"{p}: unreadable GGUF metadata {key} ({_brief(e)})") from None


def _number(reader: GGUFReader, key: str, p: Path, kind: type, required: bool = True) -> Any:
    v = _value(reader, key, p)
    if v is None:
        if required:
            raise SnuggleError(f"{p}: GGUF metadata lacks {key}")
        return None
    if isinstance(v, list):
        # Some converters store per-layer arrays; a uniform one is just the scalar.
        if not v or any(x != v[0] for x in v):
            raise SnuggleError(
                f"{p}: per-layer {key} = {v[:8]}{'...' if len(v) > 8 else ''} is not supported"
            )
        v = v[0]
    if isinstance(v, str | bool) or not isinstance(v, int | float):
        raise SnuggleError(f"{p}: GGUF metadata {key} = {_short(v)} is not a number")
    if not math.isfinite(v):
        raise SnuggleError(f"{p}: GGUF metadata {key} = {v} is not a finite number")
    return kind(v)


def _size(reader: GGUFReader, key: str, p: Path, required: bool = True) -> int | None:
    """A count or dimension: a positive integer of a plausible size (a corrupt file could say 2**60)."""
    v = _number(reader, key, p, int, required)
    if v is not None and not 0 < v <= _MAX_SIZE:
        raise SnuggleError(f"{p}: GGUF metadata {key} = {v} is not a plausible size (1 to {_MAX_SIZE})")
    return v


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:60] + "..."


def _hf_name(name: str, arch: str, num_layers: int, p: Path) -> str | None:
    """The HF parameter name for GGUF tensor `name`; None for tensors that are not weights."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    if _NOT_WEIGHTS.fullmatch(name):
        return None
    m = _BLOCK_RE.fullmatch(name)
    known = m is not None and m.group(2) in _BLOCK
    if known and m.group(2) in _QK_NORM and arch != "qwen3":
        known = False
    if known and m.group(2) in _LLAMA_ONLY and arch != "llama":
        known = False
    if known:
        layer = int(m.group(1))
        if layer >= num_layers:
            raise SnuggleError(f"{p}: tensor {name} is beyond {arch}.block_count = {num_layers}")
        return f"model.layers.{layer}.{_BLOCK[m.group(2)]}"
    raise SnuggleError(f"{p}: unsupported tensor {name} for GGUF architecture {arch!r}")


def _tensor_type(t: ReaderTensor, p: Path) -> GGMLQuantizationType:
    kind = _Q(t.tensor_type)
    if kind not in SUPPORTED_TENSOR_TYPES:
        names = ", ".join(sorted(k.name for k in SUPPORTED_TENSOR_TYPES))
        raise SnuggleError(f"{p}: tensor {t.name} has unsupported type {kind.name} (supported: {names})")
    return kind


def _config(p: Path, reader: GGUFReader) -> dict[str, Any]:
    arch = _value(reader, "general.architecture", p)
    if arch is None:
        raise SnuggleError(f"{p}: GGUF metadata lacks general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise SnuggleError(f"{p}: unsupported GGUF architecture {arch!r} (supported: {supported})")
    model_type, hf_class = SUPPORTED_ARCHITECTURES[arch]
    if _number(reader, f"{arch}.expert_count", p, int, required=False):
        raise SnuggleError(f"{p}: mixture-of-experts GGUF files ({arch}.expert_count > 0) are not supported")

    hidden = _size(reader, f"{arch}.embedding_length", p)
    heads = _size(reader, f"{arch}.attention.head_count", p)
    kv_heads = _size(reader, f"{arch}.attention.head_count_kv", p, required=False) or heads
    num_layers = _size(reader, f"{arch}.block_count", p)
    head_dim = _size(reader, f"{arch}.attention.key_length", p, required=False)
    if head_dim is None:
        if heads <= 0 or hidden % heads:
            raise SnuggleError(
                f"{p}: {arch}.embedding_length {hidden} is not a multiple of head_count {heads}"
            )
        head_dim = hidden // heads
    value_dim = _size(reader, f"{arch}.attention.value_length", p, required=False)
    rope_dim = _size(reader, f"{arch}.rope.dimension_count", p, required=False)
    if value_dim not in (None, head_dim) or rope_dim not in (None, head_dim):
        raise SnuggleError(
            f"{p}: key_length {head_dim}, value_length {value_dim} and rope.dimension_count {rope_dim} "
            "differ; only full rotary on equal key/value heads is supported"
        )
    rope_theta = _number(reader, f"{arch}.rope.freq_base", p, float, required=False) or 10000.0
    if rope_theta <= 0:
        raise SnuggleError(f"{p}: GGUF metadata {arch}.rope.freq_base = {rope_theta} must be > 0")
    if heads % kv_heads:
        raise SnuggleError(
            f"{p}: {arch}.attention.head_count {heads} is not a multiple of head_count_kv {kv_heads}"
        )

    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:  # fail on an unknown tensor or type now, before any weight is built
        _hf_name(t.name, arch, num_layers, p)
        _tensor_type(t, p)
    # every block the config counts must have weights: a corrupt block_count of 2**31 would otherwise
    # have the model built with that many (empty) layers before the missing tensors are noticed
    blocks = {int(m.group(1)) for t in reader.tensors if (m := _BLOCK_RE.fullmatch(t.name))}
    if len(blocks) != num_layers or max(blocks, default=-1) != num_layers - 1:  # i.e. not 0..n-1
        raise SnuggleError(
            f"{p}: {arch}.block_count is {num_layers}, but the file has weights for {len(blocks)} blocks"
        )
    if "token_embd.weight" not in tensors:
        raise SnuggleError(f"{p}: GGUF file has no token_embd.weight tensor")
    embed_rows = int(tensors["token_embd.weight"].shape[-1])  # GGUF shapes list the fastest dim first
    vocab = _size(reader, f"{arch}.vocab_size", p, required=False)
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)  # counts without decoding 100k strings
    if vocab is None:
        vocab = embed_rows
    if vocab != embed_rows:
        raise SnuggleError(f"{p}: vocab size {vocab} does not match token_embd.weight's {embed_rows} rows")

    return {
        "model_type": model_type,
        "architectures": [hf_class],
        "hidden_size": hidden,
        "intermediate_size": _size(reader, f"{arch}.feed_forward_length", p),
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _eps(reader, f"{arch}.attention.layer_norm_rms_epsilon", p),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(
            p, reader, arch, tensors.get("rope_freqs.weight"), head_dim, rope_theta
        ),
        "max_position_embeddings": _size(reader, f"{arch}.context_length", p),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_gate.bias" in tensors,
        "bos_token_id": _number(reader, "tokenizer.ggml.bos_token_id", p, int, required=False),
        "eos_token_id": _number(reader, "tokenizer.ggml.eos_token_id", p, int, required=False),
        "pad_token_id": _number(reader, "tokenizer.ggml.padding_token_id", p, int, required=False),
        "torch_dtype": _lossless_dtype(reader),
    }


def _eps(reader: GGUFReader, key: str, p: Path) -> float:
    eps = _number(reader, key, p, float)
    if not 0 < eps < 1:
        raise SnuggleError(f"{p}: GGUF metadata {key} = {eps} is not an epsilon in (0, 1)")
    return eps


def _lossless_dtype(reader: GGUFReader) -> str:
    """The narrowest dtype that holds the matrices exactly, which is what `torch_dtype` means in a config.

    Quantized blocks dequantize to f16-scale * int (+ f16-min) products computed in f32, which neither f16
    nor bf16 represents exactly; 1-D tensors (norms, biases) are F32 in every llama.cpp file and say nothing.
    """
    kinds = {_Q(t.tensor_type) for t in reader.tensors if len(t.shape) >= 2}
    if kinds == {_Q.F16}:
        return "float16"
    if kinds == {_Q.BF16}:
        return "bfloat16"
    return "float32"


def _rope_scaling(
    p: Path, reader: GGUFReader, arch: str, rope_freqs: ReaderTensor | None, head_dim: int, theta: float
) -> dict[str, Any] | None:
    prefix = f"{arch}.rope.scaling."
    params = {k[len(prefix) :]: _value(reader, k, p) for k in reader.fields if k.startswith(prefix)}
    kind = str(params.pop("type", "") or "").lower()
    params.pop("finetuned", None)  # informational only
    for k, v in params.items():  # every parameter below is a number: say which one is not
        if v is not None and (isinstance(v, str | bool | list) or not math.isfinite(v)):
            raise SnuggleError(f"{p}: GGUF metadata {prefix}{k} = {_short(v)} is not a finite number")

    if kind == "llama3" or {"low_freq_factor", "high_freq_factor"} & params.keys():
        needed = ("factor", "low_freq_factor", "high_freq_factor", "original_context_length")
        missing = [prefix + k for k in needed if params.get(k) is None]
        if missing:
            raise SnuggleError(f"{p}: llama3 rope scaling lacks {', '.join(missing)}")
        scaling = {
            "rope_type": "llama3",
            "factor": float(params["factor"]),
            "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]),
            "original_max_position_embeddings": int(params["original_context_length"]),
        }
        if not (
            scaling["factor"] > 0
            and 0 < scaling["low_freq_factor"] < scaling["high_freq_factor"]
            and 0 < scaling["original_max_position_embeddings"] <= _MAX_SIZE
        ):
            raise SnuggleError(f"{p}: llama3 rope scaling parameters out of range: {scaling}")
        if rope_freqs is not None:
            _check_llama3_freqs(p, rope_freqs, scaling, head_dim, theta)
        return scaling
    if rope_freqs is not None:
        # llama.cpp's converter bakes Llama 3.x scaling into this tensor and drops the parameters;
        # transformers needs the parameters, and recovering them from the tensor is guesswork we do not do.
        raise SnuggleError(
            f"{p}: rope_freqs without parameters is unsupported (the file has a rope_freqs tensor but no "
            f"{prefix}factor/low_freq_factor/high_freq_factor/original_context_length)"
        )

    factor = params.pop("factor", None)
    if factor is None:  # the key's name before GGUF v3
        factor = _number(reader, f"{arch}.rope.scale_linear", p, float, required=False)
    orig = params.pop("original_context_length", None)
    if kind == "" and factor not in (None, 0.0, 1.0):
        kind = "linear"  # llama.cpp reads a bare factor as linear scaling
    if kind in ("", "none") or (kind == "linear" and factor in (None, 0.0, 1.0)):
        return None
    if factor is not None and factor <= 0:
        raise SnuggleError(f"{p}: rope scaling factor {factor} must be > 0")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn" and factor is not None:
        yarn: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        if orig:
            yarn["original_max_position_embeddings"] = int(orig)
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if params.get(gguf_key) is not None:
                yarn[hf_key] = float(params.pop(gguf_key))
        if params.get("attn_factor") in (None, 1.0):
            params.pop("attn_factor", None)
        if params:
            # llama.cpp's attention-scale knobs have no exact transformers counterpart.
            raise SnuggleError(f"{p}: unsupported yarn rope scaling parameters {sorted(params)}")
        return yarn
    raise SnuggleError(f"{p}: unsupported rope scaling type {kind!r} (supported: linear, yarn, llama3)")


def _check_llama3_freqs(p: Path, t: ReaderTensor, s: dict[str, Any], head_dim: int, theta: float) -> None:
    """Refuse a rope_freqs tensor that disagrees with the llama3 parameters next to it.

    Recomputes the factors as convert_hf_to_gguf.py does (the formula is continuous at the band edges, so a
    tolerance covers its float32 arithmetic).
    """
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    with np.errstate(all="ignore"):  # a corrupt file's extreme values give inf/NaN, then a mismatch below
        wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = 1.0 / ((1.0 - smooth) / factor + smooth)
    expected = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))
    with np.errstate(all="ignore"):
        actual = dequantize(t.data, _tensor_type(t, p)).astype(np.float64).reshape(-1)
    if actual.shape != expected.shape or not np.allclose(actual, expected, rtol=1e-3, atol=1e-6):
        raise SnuggleError(f"{p}: rope_freqs tensor does not match the llama3 rope scaling parameters {s}")


# --- tensors ----------------------------------------------------------------------------------------------


def _iter_tensors(
    p: Path, reader: GGUFReader, cfg: dict[str, Any], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    arch = next(a for a, (mt, _) in SUPPORTED_ARCHITECTURES.items() if mt == cfg["model_type"])
    for t in reader.tensors:
        name = _hf_name(t.name, arch, cfg["num_hidden_layers"], p)
        if name is not None:
            yield name, _hf_tensor(t, name, arch, cfg, dtype, p)


def _index(
    p: Path, reader: GGUFReader, cfg: dict[str, Any], dtype: torch.dtype
) -> dict[str, Callable[[], torch.Tensor]]:
    arch = next(a for a, (mt, _) in SUPPORTED_ARCHITECTURES.items() if mt == cfg["model_type"])
    index: dict[str, Callable[[], torch.Tensor]] = {}
    for t in reader.tensors:
        name = _hf_name(t.name, arch, cfg["num_hidden_layers"], p)
        if name is not None:
            index[name] = functools.partial(_hf_tensor, t, name, arch, cfg, dtype, p)
    return index


def _hf_tensor(
    t: ReaderTensor, name: str, arch: str, cfg: dict[str, Any], dtype: torch.dtype, p: Path
) -> torch.Tensor:
    w = _to_torch(t, dtype, p)
    # llama.cpp's converter permutes llama-arch Q/K rows (weights and biases) so that its rotary can
    # rotate adjacent pairs; transformers rotates the two halves of each head. Qwen files are unpermuted.
    if arch == "llama" and ".q_proj." in name:
        w = _unpermute(w, cfg["num_attention_heads"], t.name, p)
    elif arch == "llama" and ".k_proj." in name:
        w = _unpermute(w, cfg["num_key_value_heads"], t.name, p)
    return w


def _to_torch(t: ReaderTensor, dtype: torch.dtype, p: Path) -> torch.Tensor:
    kind = _tensor_type(t, p)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
    try:
        if kind in (_Q.F32, _Q.F16):
            # np.array copies out of the read-only memory map: callers own what we yield.
            w = torch.from_numpy(np.array(t.data))
        elif kind == _Q.BF16:
            # numpy has no bfloat16: reinterpret the raw bytes in torch rather than widen to f32 first.
            w = torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16)
        else:
            with np.errstate(all="ignore"):  # a corrupt scale gives NaN/inf: refused below, not warned
                w = torch.from_numpy(dequantize(t.data, kind))
        w = w.reshape(shape).to(dtype)
    except (ValueError, RuntimeError) as e:
        raise SnuggleError(f"{p}: cannot decode tensor {t.name} ({kind.name}, {_brief(e)})") from None
    if not torch.isfinite(w).all():  # a corrupt block scale: a model never holds NaN or inf weights
        raise SnuggleError(f"{p}: tensor {t.name} holds NaN or infinite values (corrupt file)")
    return w


def _unpermute(w: torch.Tensor, n_head: int, name: str, p: Path) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's `permute`: per head, rows (2, d/2) were stored as (d/2, 2)."""
    rows = w.shape[0]
    if n_head <= 0 or rows % (2 * n_head):
        raise SnuggleError(f"{p}: tensor {name} has {rows} rows, not a multiple of 2 x {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
