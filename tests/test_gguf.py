"""snuggle.io.gguf against transformers' own GGUF loader (real SmolLM2 file) and against tiny files we write
the way llama.cpp's convert_hf_to_gguf.py does (Q/K permutation included)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; fail rather than reach for the hub

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from snuggle.errors import SnuggleError
from snuggle.io.gguf import SUPPORTED_TENSOR_TYPES, iter_gguf_tensors, load_gguf_tokenizer, read_gguf_config

FINITE_F16_BYTES = np.array([b for b in range(256) if b & 0x7C != 0x7C], np.uint8)


def _can_quantize(t: Q) -> bool:
    try:
        gguf.quants.quantize(np.zeros((1, 256), np.float32), t)
    except NotImplementedError:
        return False
    return True


QUANTIZABLE = sorted((t for t in SUPPORTED_TENSOR_TYPES if _can_quantize(t)), key=int)
# Supported types gguf-py cannot produce (the K-quants): tested on random blocks instead.
DEQUANT_ONLY = sorted((t for t in SUPPORTED_TENSOR_TYPES if not _can_quantize(t)), key=int)
# Max error relative to the tensor's largest magnitude; a misplaced row is off by O(1), far above these.
TOLERANCE = {
    Q.F32: 0.0,
    Q.F16: 1e-3,
    Q.BF16: 1e-2,
    Q.Q8_0: 1e-2,
    Q.Q5_0: 0.05,
    Q.Q5_1: 0.05,
    Q.Q4_0: 0.1,
    Q.Q4_1: 0.1,
}


# --- the real model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_ours(smollm: Path) -> dict[str, torch.Tensor]:
    return dict(iter_gguf_tensors(smollm, torch.float32))


def test_real_config_matches_transformers(smollm: Path) -> None:
    ours = read_gguf_config(smollm)
    ref = AutoConfig.from_pretrained(str(smollm.parent), gguf_file=smollm.name)
    assert ours["model_type"] == ref.model_type == "llama"
    assert ours["architectures"] == ["LlamaForCausalLM"]
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "attention_bias",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert ours[key] == getattr(ref, key), key
    assert ours["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert ours["rope_scaling"] is None and ref.rope_parameters["rope_type"] == "default"
    assert ours["torch_dtype"] == "float32"  # Q4_1/Q8_0 dequantize to f32 products


def test_real_tensors_match_transformers(smollm: Path, smollm_ours: dict[str, torch.Tensor]) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        str(smollm.parent), gguf_file=smollm.name, dtype=torch.float32
    )
    ref = model.state_dict()
    assert model.config.tie_word_embeddings and "lm_head.weight" not in smollm_ours
    assert set(smollm_ours) == set(ref) - {"lm_head.weight"}
    for name, ours in smollm_ours.items():
        assert ours.dtype == torch.float32 and ours.shape == ref[name].shape, name
        torch.testing.assert_close(ours, ref[name], rtol=0, atol=1e-6, msg=name)


def test_real_tensors_in_bf16(smollm: Path, smollm_ours: dict[str, torch.Tensor]) -> None:
    it = iter_gguf_tensors(smollm, torch.bfloat16)
    for _ in range(12):  # the embedding and the first block are enough: the path is per-tensor
        name, t = next(it)
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, smollm_ours[name].to(torch.bfloat16)), name


def test_real_tokenizer_matches_transformers(smollm: Path) -> None:
    ours = load_gguf_tokenizer(smollm)
    ref = AutoTokenizer.from_pretrained(str(smollm.parent), gguf_file=smollm.name)
    text = "Hello world, ciao mondo"
    assert ours.is_fast
    assert ours(text).input_ids == ref(text).input_ids
    assert ours.eos_token_id == 2
    assert ours.chat_template == ref.chat_template  # the GGUF's tokenizer.chat_template
    assert ours.chat_template.startswith("{% for message in messages %}")
    prompt = ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in prompt


# --- synthetic files, written the way convert_hf_to_gguf.py writes them -----------------------------------


def _tiny(kind: str, **overrides: Any) -> torch.nn.Module:
    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    common.update(overrides)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(rope_theta=500000.0, **common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(rope_theta=1e6, **common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(rope_theta=1e6, **{"head_dim": 32, **common}))
    # HF initializes norms to 1 and biases to 0, which would hide a wrong layout: randomize everything.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute: each head's (2, d/2) rows become (d/2, 2) pairs.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(
    path: Path,
    model: torch.nn.Module,
    arch: str,
    qtype: Q = Q.F32,
    *,
    random_blocks: bool = False,
    kv: dict[str, Any] | None = None,
    extra: dict[str, np.ndarray] | None = None,
    skip: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Write `model` as a GGUF file; return the HF state dict we expect to read back.

    Matrices are stored as `qtype`, 1-D tensors as F32 (as llama.cpp does). With `random_blocks` the
    matrices are random bytes of `qtype` instead (for types gguf-py cannot quantize) and the expectation is
    gguf-py's dequantization of those bytes.
    """
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if head_dim != c.hidden_size // c.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    for key, value in (kv or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    rng = np.random.default_rng(0)
    expected = {}
    for name, t in model.state_dict().items():
        if (name == "lm_head.weight" and c.tie_word_embeddings) or name in skip:
            continue
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        data = t.numpy()
        if arch == "llama" and ".q_proj." in name:
            data = _llama_cpp_permute(data, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            data = _llama_cpp_permute(data, c.num_key_value_heads)
        if data.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gname, data)
            expected[name] = t
        elif random_blocks:
            assert arch != "llama", "the expectation below does not undo the permutation"
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            # random bytes, minus those that could make an f16 scale inf/NaN (exponent bits all set)
            raw = rng.choice(FINITE_F16_BYTES, (data.shape[0], data.shape[1] // block * size))
            w.add_tensor(gname, raw, raw_dtype=qtype)
            expected[name] = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
        else:
            w.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            # Quantization blocks lie within rows, so it commutes with the row permutation: the expectation is
            # the round trip of the unpermuted HF tensor.
            expected[name] = torch.from_numpy(
                gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), qtype), qtype)
            )
    for gname, data in (extra or {}).items():
        w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _check_config(cfg: dict[str, Any], model: torch.nn.Module, arch: str) -> None:
    c = model.config
    assert cfg["model_type"] == arch and cfg["architectures"] == [type(model).__name__]
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert cfg[key] == getattr(c, key), key
    assert cfg["head_dim"] == (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    assert cfg["rms_norm_eps"] == pytest.approx(c.rms_norm_eps, rel=1e-6)  # stored as float32
    assert cfg["rope_theta"] == c.rope_parameters["rope_theta"]
    assert cfg["rope_scaling"] is None
    # what a loader does with the dict: transformers rebuilds the same architecture from it
    rebuilt = AutoConfig.for_model(**cfg)
    assert type(rebuilt) is type(c) and rebuilt.rope_parameters == c.rope_parameters


def _check_tensors(path: Path, expected: dict[str, torch.Tensor], qtype: Q) -> None:
    ours = dict(iter_gguf_tensors(path, torch.float32))
    assert list(ours) == list(expected)
    for name, t in ours.items():
        torch.testing.assert_close(t, expected[name].float(), rtol=0, atol=0, msg=name)


LLAMA_QUANT_CASES = [pytest.param(t, id=t.name) for t in QUANTIZABLE]


@pytest.mark.parametrize("qtype", LLAMA_QUANT_CASES)
def test_llama_tied_roundtrip(tmp_path: Path, qtype: Q) -> None:
    model = _tiny("llama", tie_word_embeddings=True)
    path = tmp_path / "llama.gguf"
    expected = _write_gguf(path, model, "llama", qtype)
    cfg = read_gguf_config(path)
    _check_config(cfg, model, "llama")
    assert cfg["attention_bias"] is False and "lm_head.weight" not in expected
    assert cfg["torch_dtype"] == {Q.F16: "float16", Q.BF16: "bfloat16"}.get(qtype, "float32")
    _check_tensors(path, expected, qtype)
    # and against the original weights: close within the type's error, so the layout (unpermuting) is right
    state = model.state_dict()
    for name, t in iter_gguf_tensors(path):
        ref = state[name]
        assert (t - ref).abs().max() <= TOLERANCE[qtype] * ref.abs().max(), name


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=["F32", "Q8_0"])
def test_llama_untied_with_qk_bias(tmp_path: Path, qtype: Q) -> None:
    # convert_hf_to_gguf.py permutes q/k biases too. Our families have no o_proj bias: it is not written.
    model = _tiny("llama", tie_word_embeddings=False, attention_bias=True)
    path = tmp_path / "llama.gguf"
    skip = tuple(n for n in model.state_dict() if n.endswith("o_proj.bias"))
    expected = _write_gguf(path, model, "llama", qtype, skip=skip)
    cfg = read_gguf_config(path)
    _check_config(cfg, model, "llama")
    assert cfg["attention_bias"] is True and "lm_head.weight" in expected
    _check_tensors(path, expected, qtype)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0], ids=["F32", "F16", "Q8_0"])
def test_qwen2_untied_roundtrip(tmp_path: Path, qtype: Q) -> None:
    model = _tiny("qwen2", tie_word_embeddings=False)
    path = tmp_path / "qwen2.gguf"
    expected = _write_gguf(path, model, "qwen2", qtype)
    cfg = read_gguf_config(path)
    _check_config(cfg, model, "qwen2")
    assert cfg["attention_bias"] is True and "model.layers.1.self_attn.k_proj.bias" in expected
    _check_tensors(path, expected, qtype)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q4_0], ids=["F32", "Q4_0"])
def test_qwen3_head_dim_and_qk_norm(tmp_path: Path, qtype: Q) -> None:
    model = _tiny("qwen3", tie_word_embeddings=True)  # head_dim 32 != 64 / 4
    path = tmp_path / "qwen3.gguf"
    expected = _write_gguf(path, model, "qwen3", qtype)
    cfg = read_gguf_config(path)
    _check_config(cfg, model, "qwen3")
    assert cfg["head_dim"] == 32 and "model.layers.0.self_attn.q_norm.weight" in expected
    _check_tensors(path, expected, qtype)


@pytest.mark.parametrize("qtype", [pytest.param(t, id=t.name) for t in DEQUANT_ONLY])
def test_dequant_only_types(tmp_path: Path, qtype: Q) -> None:
    # K-quant rows are 256 wide: a model whose every matrix has 256 input features.
    model = _tiny(
        "qwen2", hidden_size=256, intermediate_size=256, num_hidden_layers=1, tie_word_embeddings=True
    )
    path = tmp_path / "k.gguf"
    expected = _write_gguf(path, model, "qwen2", qtype, random_blocks=True)
    _check_tensors(path, expected, qtype)


def test_bf16_output_dtype(tmp_path: Path) -> None:
    model = _tiny("qwen2", tie_word_embeddings=False)
    path = tmp_path / "q.gguf"
    expected = _write_gguf(path, model, "qwen2", Q.F16)
    for name, t in iter_gguf_tensors(path, torch.bfloat16):
        assert t.dtype == torch.bfloat16 and torch.equal(t, expected[name].to(torch.bfloat16)), name


# --- rope scaling -----------------------------------------------------------------------------------------


def _llama3_rope_freqs(
    theta: float, dim: int, factor: float, low: float, high: float, old_ctx: int
) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, in its float32 arithmetic
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_scaling(tmp_path: Path) -> None:
    model = _tiny("llama", tie_word_embeddings=True)
    path = tmp_path / "l3.gguf"
    kv = {
        "llama.rope.scaling.type": "llama3",
        "llama.rope.scaling.factor": 8.0,
        "llama.rope.scaling.low_freq_factor": 1.0,
        "llama.rope.scaling.high_freq_factor": 4.0,
        "llama.rope.scaling.original_context_length": 64,
    }
    freqs = _llama3_rope_freqs(500000.0, 16, 8.0, 1.0, 4.0, 64)
    assert 1.0 < freqs.max() and freqs.min() == 1.0  # the tiny head spans all three bands
    _write_gguf(path, model, "llama", kv=kv, extra={"rope_freqs.weight": freqs})
    cfg = read_gguf_config(path)
    assert cfg["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    assert LlamaConfig(**cfg).rope_parameters["rope_type"] == "llama3"
    assert all(not n.startswith("rope") for n, _ in iter_gguf_tensors(path))

    bad = tmp_path / "l3_bad.gguf"  # the tensor says factor 8, the metadata 4
    _write_gguf(
        bad, model, "llama", kv={**kv, "llama.rope.scaling.factor": 4.0}, extra={"rope_freqs.weight": freqs}
    )
    with pytest.raises(SnuggleError, match="rope_freqs tensor does not match"):
        read_gguf_config(bad)


def test_rope_freqs_without_parameters(tmp_path: Path) -> None:
    path = tmp_path / "l3.gguf"
    freqs = _llama3_rope_freqs(500000.0, 16, 8.0, 1.0, 4.0, 64)
    _write_gguf(path, _tiny("llama"), "llama", extra={"rope_freqs.weight": freqs})
    with pytest.raises(SnuggleError, match="rope_freqs without parameters is unsupported"):
        read_gguf_config(path)
    with pytest.raises(SnuggleError, match=str(path.name)):
        iter_gguf_tensors(path)


def test_linear_rope_scaling(tmp_path: Path) -> None:
    path = tmp_path / "lin.gguf"
    _write_gguf(
        path,
        _tiny("qwen2"),
        "qwen2",
        kv={"qwen2.rope.scaling.type": "linear", "qwen2.rope.scaling.factor": 2.0},
    )
    assert read_gguf_config(path)["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


# --- bad input --------------------------------------------------------------------------------------------


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_text("definitely not a GGUF file\n")
    for fn in (read_gguf_config, iter_gguf_tensors, load_gguf_tokenizer):
        with pytest.raises(SnuggleError, match="not a GGUF file"):
            fn(path)
    path.write_bytes(b"")
    with pytest.raises(SnuggleError, match="not a GGUF file"):
        read_gguf_config(path)
    with pytest.raises(SnuggleError, match="no such GGUF file"):
        read_gguf_config(tmp_path / "missing.gguf")


def test_truncated(tmp_path: Path) -> None:
    full = tmp_path / "full.gguf"
    _write_gguf(full, _tiny("llama"), "llama", Q.Q8_0)
    data = full.read_bytes()
    for cut in (6, 20, 200, len(data) // 2, len(data) - 4096):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(SnuggleError, match="truncated or corrupt"):
            read_gguf_config(path)
        with pytest.raises(SnuggleError, match=path.name):
            iter_gguf_tensors(path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SnuggleError, match=r"unsupported GGUF architecture 'gpt2' \(supported: llama, qwen2"):
        read_gguf_config(path)
    with pytest.raises(SnuggleError, match="gpt2"):
        iter_gguf_tensors(path)


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    model = _tiny("qwen2", hidden_size=256, intermediate_size=256, num_hidden_layers=1)
    path = tmp_path / "tq.gguf"
    _write_gguf(path, model, "qwen2", Q.TQ1_0, random_blocks=True)
    with pytest.raises(SnuggleError, match="unsupported type TQ1_0"):
        read_gguf_config(path)


def test_unknown_tensor(tmp_path: Path) -> None:
    # q_norm is a Qwen3 tensor: in a llama file the model would have nowhere to put it
    path = tmp_path / "odd.gguf"
    _write_gguf(path, _tiny("llama"), "llama", extra={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)})
    with pytest.raises(SnuggleError, match="unsupported tensor blk.0.attn_q_norm.weight"):
        read_gguf_config(path)
    # an MLP bias is llama's alone (mlp_bias); in a qwen2 file it would be dropped
    path = tmp_path / "odd-qwen2.gguf"
    _write_gguf(path, _tiny("qwen2"), "qwen2", extra={"blk.0.ffn_up.bias": np.ones(128, np.float32)})
    with pytest.raises(SnuggleError, match="unsupported tensor blk.0.ffn_up.bias"):
        read_gguf_config(path)


def test_tokenizer_errors_are_wrapped(tmp_path: Path) -> None:
    path = tmp_path / "notok.gguf"  # a valid model file without tokenizer metadata
    _write_gguf(path, _tiny("llama"), "llama")
    with pytest.raises(SnuggleError, match="cannot build a tokenizer"):
        load_gguf_tokenizer(path)


def test_tokenizer_comes_from_the_file_even_beside_a_tokenizer_json(smollm: Path, tmp_path: Path) -> None:
    """transformers prefers a tokenizer.json in the same folder; ours must read the GGUF's own vocabulary."""
    src = smollm
    d = tmp_path / "mixed"
    d.mkdir()
    (d / src.name).symlink_to(src)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    decoy = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "x": 1}, unk_token="<unk>"))
    )
    decoy.save_pretrained(str(d))
    tok = load_gguf_tokenizer(d / src.name)
    assert len(tok) >= 49152 and tok.eos_token_id == 2
