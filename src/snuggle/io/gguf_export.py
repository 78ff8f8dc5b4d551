"""Writing a snuggle `Decoder` (LoRA merged) and its tokenizer as a llama.cpp GGUF file.

The layout follows llama.cpp's `convert_hf_to_gguf.py`: architecture `llama` (Llama, Mistral, SmolLM,
TinyLlama) with Q/K rows permuted for llama.cpp's rotary, `qwen2`, `qwen3`; 1-D tensors (norms, biases)
always F32; tied embeddings stored once (no `output.weight`); the tokenizer as `tokenizer.ggml.*` metadata.
`snuggle.io.gguf` reads every file written here back to the same model (see tests/test_gguf_export.py).

Memory: tensor headers are planned first and the data is converted and written one tensor at a time, so
the exporter never holds a second full copy of the weights (beyond what `merged_state_dict` makes for
LoRA-merged projections).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    MODEL_TENSOR,
    MODEL_TENSORS,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    TokenType,
    get_tensor_name_map,
)
from gguf.quants import quant_shape_to_byte_shape, quantize

from snuggle.errors import SnuggleError
from snuggle.io.peft_format import merged_state_dict

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from snuggle.model.args import ModelArgs
    from snuggle.model.decoder import Decoder

__all__ = ["EXPORT_DTYPES", "write_gguf"]

_Q = GGMLQuantizationType
# dtype name -> (type of the matrices, general.file_type)
_DTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (_Q.F32, LlamaFileType.ALL_F32),
    "f16": (_Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (_Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (_Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (_Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (_Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (_Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (_Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
EXPORT_DTYPES: tuple[str, ...] = tuple(_DTYPES)
# The 4/5-bit types keep the output layer (the embedding, when tied: llama.cpp reads it as the output) in
# Q8_0: llama-quantize gives it Q6_K for the same reason, the logits being the most sensitive product;
# gguf-py has no Q6_K quantizer, so Q8_0 is the nearest type we can write.
_LOW_BIT = {_Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1}

# snuggle model_type -> llama.cpp architecture. Mistral is plain llama to llama.cpp (its sliding window is
# dropped, exactly as convert_hf_to_gguf.py does).
_ARCHS: dict[str, MODEL_ARCH] = {
    "llama": MODEL_ARCH.LLAMA,
    "mistral": MODEL_ARCH.LLAMA,
    "qwen2": MODEL_ARCH.QWEN2,
    "qwen3": MODEL_ARCH.QWEN3,
}
# Biases llama.cpp's qwen2/qwen3 (and our reader of them) do not have: refused rather than dropped.
_NO_BIAS = (MODEL_TENSOR.ATTN_OUT, MODEL_TENSOR.FFN_GATE, MODEL_TENSOR.FFN_UP, MODEL_TENSOR.FFN_DOWN)

# `tokenizer.ggml.pre` names for the byte-level pre-tokenizers of the families we own, keyed by the split
# regex of their tokenizer.json (llama.cpp picks its own regex from the name).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
_SPM_SPACE = "\u2581"  # SentencePiece's visible space
_SPACE_IN_MERGE = chr(ord(" ") + 256)  # how gguf-py's SpecialVocab spells a space inside a merge part
_F16_INF = 65520.0  # the smallest magnitude float16 rounds to inf (its largest finite value is 65504)


def write_gguf(
    model: Decoder,
    tokenizer: PreTrainedTokenizerBase,
    out_path: str | os.PathLike[str],
    dtype: str = "f16",
    *,
    tokenizer_pre: str | None = None,
    name: str | None = None,
) -> Path:
    """Write `model` (LoRA merged in) and `tokenizer` to `out_path` as a llama.cpp GGUF file; returns it.

    `dtype` is the type of the 2-D tensors: "f16", "bf16", "f32", "q8_0", or "q5_1" / "q5_0" / "q4_1" /
    "q4_0" with the output layer in q8_0 (a matrix whose rows are not a multiple of the 32-value block
    falls back to f16, as in llama.cpp's converter); 1-D tensors are always f32.
    `tokenizer_pre` overrides the llama.cpp pre-tokenizer name (`tokenizer.ggml.pre`) for a byte-level
    tokenizer whose pre-tokenizer is not recognized. The file appears atomically (temp file + rename).
    """
    if dtype not in _DTYPES:
        raise SnuggleError(f"unknown GGUF export dtype {dtype!r}; use one of {', '.join(EXPORT_DTYPES)}")
    args = model.args
    arch = _ARCHS.get(args.model_type)
    if arch is None:
        raise SnuggleError(f"GGUF export does not support model_type {args.model_type!r}")
    out = Path(out_path).expanduser()
    if out.is_dir():
        raise SnuggleError(f"{out}: is a directory; give the .gguf file to write")
    if not out.parent.is_dir():
        raise SnuggleError(f"{out.parent}: output directory does not exist")
    if args.sliding_window and args.sliding_window < args.max_position_embeddings:
        warnings.warn(
            f"llama.cpp ignores the sliding window ({args.sliding_window} tokens) of a {args.model_type} "
            "model: the GGUF attends to the whole context, so outputs differ past the window",
            stacklevel=2,
        )

    # Everything that can fail on bad input is checked before the first byte is written.
    vocab = _vocab(tokenizer, args.vocab_size, getattr(model, "source", None), tokenizer_pre)
    state = merged_state_dict(model)
    matrix_type, file_type = _DTYPES[dtype]
    plan = _plan(state, args, arch, matrix_type)
    fallback = [p.gguf_name for p in plan if p.qtype == _Q.F16 != matrix_type and len(p.shape) >= 2]
    if fallback:
        warnings.warn(
            f"{len(fallback)} tensor(s) have rows that are not a multiple of the {dtype} block size and are "
            f"written as f16 instead ({', '.join(fallback[:3])}{' ...' if len(fallback) > 3 else ''})",
            stacklevel=2,
        )

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    writer = GGUFWriter(tmp, _arch_name(arch))
    try:
        _write_metadata(writer, args, arch, file_type, name or _default_name(args, out))
        _write_tokenizer(writer, vocab)
        for p in plan:
            writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in plan:  # same order as the tensor infos: write_tensor_data pops them first-in first-out
            writer.write_tensor_data(_encode(p, state, args))
        writer.flush()
        for f in writer.fout or ():
            os.fsync(f.fileno())
        writer.close()
        os.replace(tmp, out)  # the file appears complete or not at all
    finally:
        writer.close()  # idempotent; closes the temp file when a tensor failed half-way
        with contextlib.suppress(OSError):
            tmp.unlink()
    return out


# --- metadata ---------------------------------------------------------------------------------------------


def _arch_name(arch: MODEL_ARCH) -> str:
    return MODEL_ARCH_NAMES[arch]


def _default_name(args: ModelArgs, out: Path) -> str:
    src = args.hf_config.get("_name_or_path") or ""
    return Path(str(src)).name or out.stem


def _write_metadata(
    w: GGUFWriter, args: ModelArgs, arch: MODEL_ARCH, file_type: LlamaFileType, name: str
) -> None:
    w.add_type("model")
    w.add_name(name)
    w.add_file_type(int(file_type))
    w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.hidden_size)
    w.add_block_count(args.num_layers)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(args.num_heads)
    w.add_head_count_kv(args.num_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.rms_norm_eps)
    w.add_rope_dimension_count(args.head_dim)  # full rotary in every family we own
    w.add_vocab_size(args.vocab_size)
    if args.head_dim * args.num_heads != args.hidden_size:
        # Qwen3-style explicit head_dim; llama.cpp otherwise assumes hidden_size / head_count
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)

    sc = args.rope_scaling
    if sc is None:
        return
    kind = sc.get("rope_type", sc.get("type"))
    prefix = f"{_arch_name(arch)}.rope.scaling."
    if kind == "linear":
        w.add_string(prefix + "type", "linear")
        w.add_float32(prefix + "factor", float(sc["factor"]))
    elif kind == "llama3":
        # llama.cpp applies llama3 scaling through the rope_freqs tensor alone (see _plan) and reads
        # rope.scaling.factor as a *linear* scale on top of it. Type "none" makes it ignore the factor
        # ("never scale if scaling type is none"), while our reader finds the parameters it needs to
        # rebuild the HF config; low/high_freq_factor are keys llama.cpp does not read.
        w.add_string(prefix + "type", "none")
        w.add_float32(prefix + "factor", float(sc["factor"]))
        w.add_float32(prefix + "low_freq_factor", float(sc["low_freq_factor"]))
        w.add_float32(prefix + "high_freq_factor", float(sc["high_freq_factor"]))
        w.add_uint32(prefix + "original_context_length", int(sc["original_max_position_embeddings"]))
    else:
        raise SnuggleError(f"GGUF export does not support rope scaling {kind!r}")


def _llama3_rope_freqs(args: ModelArgs) -> np.ndarray:
    """Per-frequency divisors (head_dim/2,) f32, as convert_hf_to_gguf.py's LlamaModel writes rope_freqs."""
    sc = args.rope_scaling or {}
    factor, low, high = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_ctx = float(sc["original_max_position_embeddings"])
    d = args.head_dim
    wavelen = 2 * math.pi * args.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)  # (d/2,)
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1.0 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))
    return out.astype(np.float32)


# --- tensors ----------------------------------------------------------------------------------------------


@dataclass
class _Tensor:
    gguf_name: str
    hf_name: str | None  # None: derived (rope_freqs)
    shape: tuple[int, ...]  # torch order, slowest dim first
    qtype: GGMLQuantizationType
    permute_heads: int = 0  # llama Q/K rows: permute for this many heads

    @property
    def nbytes(self) -> int:
        if self.qtype == _Q.F32:
            return 4 * math.prod(self.shape)
        return math.prod(quant_shape_to_byte_shape(self.shape, self.qtype))


def _plan(
    state: dict[str, torch.Tensor], args: ModelArgs, arch: MODEL_ARCH, matrix_type: GGMLQuantizationType
) -> list[_Tensor]:
    names = get_tensor_name_map(arch, args.num_layers)
    allowed = set(MODEL_TENSORS[arch])
    plan: list[_Tensor] = []
    if args.rope_scaling and args.rope_scaling.get("rope_type", args.rope_scaling.get("type")) == "llama3":
        if arch != MODEL_ARCH.LLAMA:
            raise SnuggleError(f"llama3 rope scaling on a {_arch_name(arch)} model cannot be written to GGUF")
        plan.append(_Tensor("rope_freqs.weight", None, (args.head_dim // 2,), _Q.F32))
    for hf_name, t in state.items():
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed:
            raise SnuggleError(f"tensor {hf_name} has no llama.cpp {_arch_name(arch)} counterpart")
        kind, gguf_name = found
        # llama.cpp's llama takes optional o_proj and MLP biases (attention_bias, mlp_bias); qwen2/3 do not
        if hf_name.endswith(".bias") and kind in _NO_BIAS and arch != MODEL_ARCH.LLAMA:
            raise SnuggleError(f"tensor {hf_name}: llama.cpp's {_arch_name(arch)} has no bias there")
        if not t.is_floating_point():
            raise SnuggleError(f"tensor {hf_name} is {t.dtype}, not a floating-point weight")
        shape = tuple(int(d) for d in t.shape)
        if len(shape) == 1:
            qtype = _Q.F32  # norms and biases: llama.cpp computes with them in f32
        else:
            output = kind == MODEL_TENSOR.OUTPUT or (
                kind == MODEL_TENSOR.TOKEN_EMBD and args.tie_word_embeddings
            )
            qtype = _Q.Q8_0 if matrix_type in _LOW_BIT and output else matrix_type
            if shape[-1] % GGML_QUANT_SIZES[qtype][0]:
                qtype = _Q.F16  # blocks run along rows; convert_hf_to_gguf.py falls back to f16 too
        heads = 0
        if arch == MODEL_ARCH.LLAMA and kind == MODEL_TENSOR.ATTN_Q:
            heads = args.num_heads
        elif arch == MODEL_ARCH.LLAMA and kind == MODEL_TENSOR.ATTN_K:
            heads = args.num_kv_heads
        plan.append(_Tensor(gguf_name, hf_name, shape, qtype, heads))
    return plan


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's `permute`: per head, rows (2, d/2) become (d/2, 2) (HF half-split rotary ->
    llama.cpp's adjacent pairs); the inverse of snuggle.io.gguf's `_unpermute`."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _encode(p: _Tensor, state: dict[str, torch.Tensor], args: ModelArgs) -> np.ndarray:
    """The bytes of one tensor as `p.qtype`, in numpy's (slowest dim first) order."""
    if p.hf_name is None:
        return _llama3_rope_freqs(args)
    t = state[p.hf_name].detach().to("cpu")
    if p.permute_heads:
        t = _permute(t, p.permute_heads)
    # aminmax is one fast pass and propagates NaN; isfinite would cost 10x more on a large model
    lo, hi = (float(v) for v in torch.aminmax(t))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise SnuggleError(f"tensor {p.hf_name} holds NaN or inf values; refusing to export a broken model")
    if p.qtype == _Q.F32:
        return t.float().contiguous().numpy()
    if p.qtype == _Q.F16:
        big = max(-lo, hi)
        if big >= _F16_INF:
            raise SnuggleError(
                f"tensor {p.hf_name} has values up to {big:.4g}, beyond float16's range (65504); "
                "export with dtype bf16 or f32"
            )
        return t.to(torch.float16).contiguous().numpy()
    if p.qtype == _Q.BF16:
        # numpy has no bfloat16: hand over the raw bits (torch rounds to nearest even, as gguf-py does)
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return quantize(t.float().contiguous().numpy(), p.qtype)


# --- tokenizer --------------------------------------------------------------------------------------------


@dataclass
class _Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE)
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    special: dict[str, int] = field(default_factory=dict)  # "bos" -> id, ...
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | list[dict[str, str]] | None = None


def _walk(node: Any) -> list[dict[str, Any]]:
    """Flatten a tokenizer.json component (normalizer, pre_tokenizer, ...) into its leaf steps."""
    if not isinstance(node, dict):
        return []
    for key in ("pretokenizers", "normalizers", "decoders", "processors"):
        if isinstance(node.get(key), list):
            return [leaf for child in node[key] for leaf in _walk(child)]
    return [node]


def _vocab(tokenizer: Any, vocab_size: int, source: str | None, pre_override: str | None) -> _Vocab:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SnuggleError(
            f"GGUF export needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    pre = _walk(spec.get("pre_tokenizer"))
    norm = _walk(spec.get("normalizer"))
    byte_level = any(s.get("type") == "ByteLevel" for s in pre + _walk(spec.get("decoder")))
    metaspace = [s for s in pre if s.get("type") == "Metaspace"]
    spm_norm = any(s.get("type") == "Replace" and s.get("content") == _SPM_SPACE for s in norm)
    if model.get("type") != "BPE":
        raise SnuggleError(
            "GGUF export supports BPE tokenizers (byte-level or SentencePiece-style), "
            f"not {model.get('type')}"
        )
    if byte_level:
        kind = "gpt2"
    elif model.get("byte_fallback") and (metaspace or spm_norm):
        kind = "llama"
    else:
        raise SnuggleError(
            "GGUF export: the tokenizer is BPE but neither byte-level nor SentencePiece-style (byte_fallback "
            "with a '\u2581' space); llama.cpp has no matching tokenizer model"
        )

    vocab = tokenizer.get_vocab()
    n = len(vocab)
    if n > vocab_size or max(vocab.values(), default=-1) >= vocab_size:
        raise SnuggleError(
            f"the tokenizer has {n} tokens (ids up to {max(vocab.values())}) but the model's embedding has "
            f"only {vocab_size} rows"
        )
    by_id: dict[int, str] = {i: tok for tok, i in vocab.items()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    special = {k: int(v) for k, v in specials.items() if v is not None}

    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            # ids the tokenizer never produces (an embedding padded to a round size): llama.cpp needs one
            # token per row, as convert_hf_to_gguf.py writes them
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif kind == "llama" and i == special.get("unk"):
            # SentencePiece's unknown piece (an added special token in transformers): llama.cpp's SPM
            # tokenizer wants it typed UNKNOWN, as convert_hf_to_gguf.py writes it from tokenizer.model
            tokens.append(tok)
            types.append(TokenType.UNKNOWN)
        elif i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif kind == "llama" and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            tokens.append(tok)
            types.append(TokenType.BYTE)
        else:
            tokens.append(tok)
            types.append(TokenType.NORMAL)

    merges = [_merge_str(m) for m in model.get("merges") or []]
    out = _Vocab(kind, "default", tokens, [int(t) for t in types], merges, special=special)
    if kind == "gpt2":
        if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in pre):
            raise SnuggleError(
                "GGUF export: a byte-level tokenizer with add_prefix_space=True has no llama.cpp equivalent"
            )
        out.pre = pre_override or _source_pre(source, vocab_size) or _detect_pre(pre)
    else:
        out.pre = pre_override or "default"
        out.scores = _spm_scores(merges, vocab, vocab_size)
        out.add_space_prefix = any(m.get("prepend_scheme", "always") != "never" for m in metaspace) or any(
            s.get("type") == "Prepend" and s.get("prepend") == _SPM_SPACE for s in norm
        )
    out.add_bos, out.add_eos = _adds_special(tokenizer, special)
    out.chat_template = _chat_template(getattr(tokenizer, "chat_template", None))
    return out


def _merge_str(m: Any) -> str:
    if isinstance(m, str):
        return m
    # tokenizers >= 0.20 stores pairs; GGUF stores "left right" with spaces inside a part re-spelled
    return " ".join(part.replace(" ", _SPACE_IN_MERGE) for part in m)


def _detect_pre(pre: list[dict[str, Any]]) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level tokenizer.json pre_tokenizer (flattened)."""
    kinds = [s.get("type") for s in pre]
    if kinds == ["ByteLevel"] and pre[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and pre[0].get("individual_digits") and pre[1].get("use_regex", True):
        return "smollm"  # SmolLM / StarCoder: one token per digit, then the GPT-2 split
    if kinds == ["Split", "ByteLevel"] and not pre[1].get("use_regex", True):
        regex = (pre[0].get("pattern") or {}).get("Regex")
        if regex in _SPLIT_PRE:
            return _SPLIT_PRE[regex]
    raise SnuggleError(
        f"GGUF export: unrecognized byte-level pre-tokenizer ({' + '.join(map(str, kinds))}); pass "
        "tokenizer_pre=<llama.cpp pre-tokenizer name> (e.g. 'llama-bpe', 'qwen2', 'gpt-2')"
    )


def _source_pre(source: str | None, vocab_size: int) -> str | None:
    """The `tokenizer.ggml.pre` of the GGUF file the model was loaded from, when the vocabulary is its own.

    transformers rebuilds a GGUF tokenizer with the plain GPT-2 split for pre-tokenizer names it does not
    know ("smollm", ...), so the tokenizer alone cannot tell them apart; the source file can.
    """
    if not source or not str(source).lower().endswith(".gguf") or not Path(source).is_file():
        return None
    try:
        kv = _skim_kv(Path(source), {"tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens"})
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return None  # an unreadable source only costs us the hint
    if kv.get("tokenizer.ggml.model") != "gpt2" or kv.get("tokenizer.ggml.tokens") != vocab_size:
        return None
    pre = kv.get("tokenizer.ggml.pre")
    return pre if isinstance(pre, str) and pre else None


# GGUF metadata value types: fixed sizes (struct formats) of the scalars; 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _skim_kv(path: Path, wanted: set[str]) -> dict[str, Any]:
    """Scalar/string values of the `wanted` metadata keys of a little-endian GGUF file (arrays: their
    length), reading only up to the last of them. gguf.GGUFReader would decode every token and merge of
    a 150k vocabulary first (seconds); this skips them.
    """
    found: dict[str, Any] = {}
    with open(path, "rb") as f:
        data = f.read(24)
        magic, version, _n_tensors, n_kv = struct.unpack("<4sIQQ", data)
        if magic != b"GGUF" or version < 2:
            raise ValueError("not a GGUF v2+ file")

        def read(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            return struct.unpack(fmt, f.read(size))[0]

        def string() -> bytes:
            return f.read(read("<Q"))

        def skip(vtype: int, count: int = 1) -> None:
            if vtype in _SCALARS:
                f.seek(struct.calcsize("<" + _SCALARS[vtype]) * count, os.SEEK_CUR)
            elif vtype == 8:
                for _ in range(count):
                    f.seek(read("<Q"), os.SEEK_CUR)
            elif vtype == 9:
                for _ in range(count):
                    item, n = read("<I"), read("<Q")
                    skip(item, n)
            else:
                raise ValueError(f"unknown GGUF value type {vtype}")

        for _ in range(n_kv):
            if len(found) == len(wanted):
                break
            key = string().decode("utf-8")
            vtype = read("<I")
            if key not in wanted:
                skip(vtype)
            elif vtype == 8:
                found[key] = string().decode("utf-8")
            elif vtype == 9:
                item, n = read("<I"), read("<Q")
                found[key] = n
                skip(item, n)
            elif vtype in _SCALARS:
                found[key] = read("<" + _SCALARS[vtype])
            else:
                raise ValueError(f"unknown GGUF value type {vtype}")
    return found


def _spm_scores(merges: list[str], vocab: dict[str, int], vocab_size: int) -> list[float]:
    """SentencePiece scores from BPE merge ranks: llama.cpp's SPM tokenizer merges the highest score first.

    The HF merges of a SentencePiece BPE model were derived from its scores, so -rank restores their order;
    tokens no merge produces (characters, bytes, specials) are never a merge result and keep 0.
    """
    scores = [0.0] * vocab_size
    for rank, m in enumerate(merges):
        left, _, right = m.partition(" ")
        tok = (left + right).replace(_SPACE_IN_MERGE, " ")
        i = vocab.get(tok)
        if i is not None and scores[i] == 0.0:
            scores[i] = -float(rank + 1)
    return scores


def _adds_special(tokenizer: Any, special: dict[str, int]) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, observed rather than read from version-specific attributes."""
    probe = "a"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    extra = len(with_special) - len(plain)
    add_bos = extra > 0 and "bos" in special and with_special[0] == special["bos"]
    add_eos = extra > 0 and "eos" in special and with_special[-1] == special["eos"]
    return add_bos, add_eos


def _chat_template(tpl: Any) -> str | list[dict[str, str]] | None:
    if not tpl:
        return None
    if isinstance(tpl, str):
        return tpl
    if isinstance(tpl, dict):
        # named templates: GGUF stores "default" as tokenizer.chat_template, others by name
        return [{"name": str(k), "template": str(v)} for k, v in tpl.items()]
    if isinstance(tpl, list):
        return list(tpl)
    raise SnuggleError(f"GGUF export: unsupported chat_template of type {type(tpl).__name__}")


def _write_tokenizer(w: GGUFWriter, v: _Vocab) -> None:
    w.add_tokenizer_model(v.model)
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.merges:
        w.add_token_merges(v.merges)
    ids = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id}
    ids["pad"] = w.add_pad_token_id
    for key, add in ids.items():
        if key in v.special:
            add(v.special[key])
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    if v.chat_template:
        w.add_chat_template(v.chat_template)
