"""snuggle.io.gguf_export: GGUF files that our reader (snuggle.load) turns back into the same model and
tokenizer, laid out as llama.cpp's convert_hf_to_gguf.py lays them out; and the real SmolLM2 round trip."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

import snuggle
from conftest import build_tiny_tokenizer
from snuggle.config import LoraConfig
from snuggle.errors import SnuggleError
from snuggle.io.gguf import load_gguf_tokenizer, read_gguf_config
from snuggle.io.gguf_export import _skim_kv, write_gguf
from snuggle.lora import LoRALinear, apply_lora
from snuggle.model.decoder import rope_inv_freq

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),
]

# Row lengths that are multiples of Q8_0's 32-wide blocks, so every matrix really is quantized.
SIZES = {"hidden_size": 64, "intermediate_size": 128}
QWEN3_SIZES = {**SIZES, "head_dim": 32}  # explicit head_dim != hidden / heads = 16, as real Qwen3 has
MATRIX_TYPE = {
    "f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0,
    "q5_1": Q.Q5_1, "q5_0": Q.Q5_0, "q4_1": Q.Q4_1, "q4_0": Q.Q4_0,
}  # fmt: skip
LOW_BIT = {"q5_1", "q5_0", "q4_1", "q4_0"}  # their output layer is written as Q8_0
# Max |logit error| / max |logit| against the *original* model. The sharp test is exactness against the
# model whose matrices went through the same rounding (below); this bound only shows each format's error
# has the expected size. Per-weight relative error: f16 <= 2^-11, bf16 <= 2^-8, q8_0 <= 1/254 of its
# 32-block's max (~1% of a typical weight); two blocks, the head and the softmax-free logits add a few
# such errors, observed 8e-4, 7e-3, 2.5e-2. The bounds leave ~4x headroom over those.
REL_BOUND = {
    "f32": 0.0,
    "f16": 4e-3,
    "bf16": 3e-2,
    "q8_0": 1e-1,
    "q5_1": 0.3,
    "q5_0": 0.3,
    "q4_1": 0.5,
    "q4_0": 0.5,
}
CASES = [
    pytest.param("llama", True, id="llama-tied"),  # the fixture's llama has llama3 rope scaling
    pytest.param("llama", False, id="llama-untied"),
    pytest.param("qwen2", False, id="qwen2-bias"),
    pytest.param("qwen3", True, id="qwen3-qknorm"),
]
TEXTS = ["the cat sees a dog", " the  big red bird.\nsings!", "a cat. the dog, a bird! the sun?", "Xyz 42"]


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))


def _fields(path: Path) -> dict[str, Any]:
    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _tensor_types(path: Path) -> dict[str, Q]:
    return {t.name: Q(t.tensor_type) for t in GGUFReader(path).tensors}


def _rounded(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """`model` with every matrix rounded as `dtype` stores it (in place)."""
    with torch.no_grad():
        for p in {id(p): p for p in model.parameters()}.values():
            if p.ndim < 2 or dtype == "f32":
                continue
            kind = MATRIX_TYPE[dtype]
            if dtype in LOW_BIT and p is model.lm_head.weight:  # the embedding too, when tied
                kind = Q.Q8_0
            if kind not in (Q.F16, Q.BF16):
                q = gguf.quants.quantize(p.numpy(), kind)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, kind)))
            else:
                p.copy_(p.to({"f16": torch.float16, "bf16": torch.bfloat16}[dtype]).float())
    return model


@pytest.mark.parametrize("dtype", list(MATRIX_TYPE))
@pytest.mark.parametrize(("family", "tie"), CASES)
def test_roundtrip_logits(tiny_hf_model, tmp_path: Path, family: str, tie: bool, dtype: str) -> None:
    src, _ = tiny_hf_model(family, tie, tmp_path, **(QWEN3_SIZES if family == "qwen3" else SIZES))
    model, tok = snuggle.load(src)
    out = tmp_path / "out" / "model.gguf"  # not next to tokenizer.json: AutoTokenizer would prefer that
    out.parent.mkdir()
    assert write_gguf(model, tok, out, dtype) == out
    assert [p.name for p in out.parent.iterdir()] == ["model.gguf"]  # no temp file left behind

    back, back_tok = snuggle.load(out)
    ids = _ids(model.args.vocab_size)
    with torch.no_grad():
        ref, got = model(ids), back(ids)
        exact = _rounded(model, dtype)(ids)
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-5)
    assert (got - ref).abs().max() <= REL_BOUND[dtype] * ref.abs().max()

    cfg = read_gguf_config(out)
    src_cfg = model.args
    assert cfg["model_type"] == family and cfg["tie_word_embeddings"] is tie
    scaling = {k: v for k, v in (src_cfg.rope_scaling or {}).items() if k != "rope_theta"}  # HF 5 folds it in
    assert (back.args.rope_scaling or {}) == scaling and back.args.rope_theta == src_cfg.rope_theta
    assert back.args.head_dim == src_cfg.head_dim
    assert cfg["attention_bias"] is (family == "qwen2")
    types = _tensor_types(out)
    assert ("output.weight" in types) is not tie
    output = {"output.weight", *(["token_embd.weight"] if tie else [])}
    for name, kind in types.items():
        one_d = name.endswith(("norm.weight", ".bias")) or name == "rope_freqs.weight"
        want = Q.Q8_0 if dtype in LOW_BIT and name in output else MATRIX_TYPE[dtype]
        assert kind == (Q.F32 if one_d else want), name
    for text in TEXTS:
        assert back_tok(text).input_ids == tok(text).input_ids, text


def test_metadata_matches_llama_cpp_conventions(tiny_hf_model, tmp_path: Path) -> None:
    src, _ = tiny_hf_model("qwen3", False, tmp_path, **QWEN3_SIZES)
    model, tok = snuggle.load(src)
    out = write_gguf(model, tok, tmp_path / "q3.gguf", "q8_0")
    f = _fields(out)
    a = model.args
    assert f["general.architecture"] == "qwen3" and f["general.file_type"] == 7  # MOSTLY_Q8_0
    assert f["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    expected = {
        "context_length": 256,
        "embedding_length": 64,
        "block_count": 2,
        "feed_forward_length": 128,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "attention.key_length": 32,  # Qwen3's explicit head_dim, != 64 / 4
        "attention.value_length": 32,
        "rope.dimension_count": 32,
        "vocab_size": 101,
    }
    for key, value in expected.items():
        assert f[f"qwen3.{key}"] == value, key
    assert f["qwen3.rope.freq_base"] == a.rope_theta
    assert f["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(a.rms_norm_eps)
    assert "qwen3.rope.scaling.type" not in f and "rope_freqs.weight" not in _tensor_types(out)
    # tokenizer: byte-level BPE, ids from the tokenizer, the embedding's 4 spare rows as unused tokens
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 101 and tokens[97:] == ["[PAD97]", "[PAD98]", "[PAD99]", "[PAD100]"]
    assert types[:4] == [gguf.TokenType.CONTROL] * 4 and set(types[97:]) == {gguf.TokenType.UNUSED}
    assert types[4:97] == [gguf.TokenType.NORMAL] * 93
    assert tokens[:97] == tok.convert_ids_to_tokens(list(range(97)))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    ids = {k: f[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown", "padding")}
    assert ids == {"bos": 1, "eos": 2, "unknown": 0, "padding": 3}
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.add_eos_token"] is False
    assert "tokenizer.chat_template" not in f


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.filterwarnings("ignore:ignored 2 checkpoint tensors:UserWarning")  # HF's o_proj.bias: not ours
def test_llama_qk_permuted_and_llama3_rope_as_llama_cpp_reads_them(tiny_hf_model, tmp_path: Path) -> None:
    src, _ = tiny_hf_model("llama", False, tmp_path, attention_bias=True, **SIZES)
    model, tok = snuggle.load(src)
    out = write_gguf(model, tok, tmp_path / "l.gguf", "f32")
    reader = GGUFReader(out)
    raw = {t.name: np.array(t.data).reshape(list(reversed(t.shape.tolist()))) for t in reader.tensors}
    a = model.args
    sd = model.state_dict()
    for kind, heads in (("q", a.num_heads), ("k", a.num_kv_heads)):
        for leaf in ("weight", "bias"):
            w = sd[f"model.layers.1.self_attn.{kind}_proj.{leaf}"].numpy()
            assert np.array_equal(raw[f"blk.1.attn_{kind}.{leaf}"], _llama_cpp_permute(w, heads))
    v = sd["model.layers.1.self_attn.v_proj.weight"].numpy()
    assert np.array_equal(raw["blk.1.attn_v.weight"], v)  # only Q and K are permuted
    # attention_bias gives Llama an o_proj bias too: llama.cpp's optional attn_output.bias, read back
    assert np.array_equal(raw["blk.1.attn_output.bias"], sd["model.layers.1.self_attn.o_proj.bias"].numpy())
    back, _ = snuggle.load(out, with_tokenizer=False)
    ids = _ids(a.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), atol=1e-5, rtol=0)

    # llama3 scaling: llama.cpp divides base^(-2i/d) by rope_freqs[i] and, with scaling type "none",
    # applies no linear factor on top; that must be exactly the model's inv_freq
    f = _fields(out)
    assert f["llama.rope.scaling.type"] == "none"
    base = 1.0 / a.rope_theta ** (np.arange(0, a.head_dim, 2, dtype=np.float64) / a.head_dim)
    llama_cpp_inv = base / raw["rope_freqs.weight"].astype(np.float64)
    np.testing.assert_allclose(llama_cpp_inv, rope_inv_freq(a).double().numpy(), rtol=1e-6)
    assert raw["rope_freqs.weight"].max() == 8.0 and raw["rope_freqs.weight"].min() == 1.0  # all 3 bands
    assert read_gguf_config(out)["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }


def test_llama_mlp_bias_is_written_as_llama_cpps_optional_ffn_biases(tiny_hf_model, tmp_path: Path) -> None:
    # llama.cpp's llama loads ffn_gate/ffn_up/ffn_down biases when present (mlp_bias); they used to be refused
    src, hf = tiny_hf_model("llama", True, tmp_path, mlp_bias=True, **SIZES)
    model, tok = snuggle.load(src)
    out = write_gguf(model, tok, tmp_path / "l.gguf", "f32")
    raw = {t.name: np.array(t.data) for t in GGUFReader(out).tensors}
    sd = model.state_dict()
    for gguf_name, hf_name in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
        bias = sd[f"model.layers.1.mlp.{hf_name}.bias"].numpy()
        assert np.array_equal(raw[f"blk.1.{gguf_name}.bias"], bias)
    assert read_gguf_config(out)["mlp_bias"] is True
    back, _ = snuggle.load(out, with_tokenizer=False)
    ids = _ids(model.args.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(back(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_llama_without_rope_scaling(tiny_hf_model, tmp_path: Path) -> None:
    src, _ = tiny_hf_model("llama", True, tmp_path, rope_scaling=None, **SIZES)
    model, tok = snuggle.load(src)
    assert model.args.rope_scaling is None
    out = write_gguf(model, tok, tmp_path / "plain.gguf", "f32")
    assert "rope_freqs.weight" not in _tensor_types(out)
    assert not any(k.startswith("llama.rope.scaling") for k in _fields(out))
    back, _ = snuggle.load(out, with_tokenizer=False)
    ids = _ids(model.args.vocab_size)
    torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=1e-5)


def test_lora_is_merged(tiny_hf_model, tmp_path: Path) -> None:
    src, _ = tiny_hf_model("qwen2", True, tmp_path, **SIZES)
    model, tok = snuggle.load(src)
    apply_lora(model, LoraConfig(r=4, alpha=8.0, train_embeddings=True))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0.0, 0.2, generator=g)
        model.model.embed_tokens.weight.add_(0.3 * torch.randn(model.model.embed_tokens.weight.shape))
    out = write_gguf(model, tok, tmp_path / "merged.gguf", "f32")
    back, _ = snuggle.load(out, with_tokenizer=False)
    ids = _ids(model.args.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=1e-5)


# --- tokenizers -------------------------------------------------------------------------------------------


def _byte_level(pre_tokenizer: Any = None, bos: bool = False, chat_template: Any = None):
    from tokenizers import processors

    tok = build_tiny_tokenizer()
    backend = tok.backend_tokenizer
    if pre_tokenizer is not None:
        backend.pre_tokenizer = pre_tokenizer
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    tok.chat_template = chat_template
    return tok


def _roundtrip_tokenizer(tiny_hf_model, tmp_path: Path, tok: Any, **kw: Any):
    src, _ = tiny_hf_model("llama", True, tmp_path, rope_scaling=None)
    model, _ = snuggle.load(src, with_tokenizer=False)
    out = tmp_path / "tok" / "m.gguf"
    out.parent.mkdir(exist_ok=True)
    write_gguf(model, tok, out, "f32", **kw)
    return out, load_gguf_tokenizer(out)


def _split(regex: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def test_pre_tokenizer_names(tiny_hf_model, tmp_path: Path) -> None:
    from tokenizers import pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2

    llama3 = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    smollm = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    text = "the cat's 12345 birds\n\n  sings"
    for pre, name in ((_split(QWEN2), "qwen2"), (_split(llama3), "llama-bpe"), (smollm, "smollm")):
        tok = _byte_level(pre)
        out, back = _roundtrip_tokenizer(tiny_hf_model, tmp_path, tok)
        assert _fields(out)["tokenizer.ggml.pre"] == name
        if name != "smollm":  # transformers' GGUF reader knows these splits (not smollm's: see limitations)
            assert back(text).input_ids == tok(text).input_ids, name

    odd = _byte_level(_split(r"\s+|\w+"))
    with pytest.raises(SnuggleError, match="unrecognized byte-level pre-tokenizer.*tokenizer_pre="):
        _roundtrip_tokenizer(tiny_hf_model, tmp_path, odd)
    out, _ = _roundtrip_tokenizer(tiny_hf_model, tmp_path, odd, tokenizer_pre="gpt-2")
    assert _fields(out)["tokenizer.ggml.pre"] == "gpt-2"


def test_bos_and_chat_templates(tiny_hf_model, tmp_path: Path) -> None:
    chatml = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    tok = _byte_level(bos=True, chat_template=chatml)
    assert tok("a cat").input_ids[0] == 1
    out, back = _roundtrip_tokenizer(tiny_hf_model, tmp_path, tok)
    assert _fields(out)["tokenizer.ggml.add_bos_token"] is True
    assert back.chat_template == chatml
    for text in TEXTS:
        assert back(text).input_ids == tok(text).input_ids
    msgs = [{"role": "user", "content": "a cat"}]
    assert back.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)

    named = _byte_level(chat_template={"default": chatml, "tool_use": "{{ messages[0]['content'] }}"})
    out, back = _roundtrip_tokenizer(tiny_hf_model, tmp_path, named)
    f = _fields(out)
    assert f["tokenizer.chat_template"] == chatml
    assert f["tokenizer.chat_template.tool_use"] == "{{ messages[0]['content'] }}"


def test_no_token_past_the_files_vocabulary(tiny_hf_model, tmp_path: Path) -> None:
    """transformers' byte-level GGUF tokenizer adds a default `<|endoftext|>` the vocabulary lacks, one id
    past the model's embedding; the loader drops it, so every id the tokenizer can produce has a row."""
    tok = _byte_level()
    assert "<|endoftext|>" not in tok.get_vocab()
    out, back = _roundtrip_tokenizer(tiny_hf_model, tmp_path, tok)
    n_tokens = len(_fields(out)["tokenizer.ggml.tokens"])
    assert max(back.get_vocab().values()) < n_tokens
    assert all(i < n_tokens for i in back("a<|endoftext|>b").input_ids)


def _sentencepiece_tokenizer():
    """A Llama-2-style SentencePiece BPE (byte fallback, '\u2581' for spaces) of 296 tokens."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for c in "\u2581abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("\u2581", "c"), ("a", "t"), ("\u2581c", "at")]
    merges += [("\u2581", "a"), ("o", "g"), ("\u2581", "d"), ("\u2581d", "og")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    return LlamaTokenizer(vocab=vocab, merges=merges)


def test_sentencepiece_tokenizer(tiny_hf_model, tmp_path: Path) -> None:
    tok = _sentencepiece_tokenizer()
    src, _ = tiny_hf_model("llama", False, tmp_path, vocab_size=300, rope_scaling=None)
    model, _ = snuggle.load(src, with_tokenizer=False)
    out = tmp_path / "spm" / "m.gguf"
    out.parent.mkdir()
    write_gguf(model, tok, out, "f32")
    f = _fields(out)
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.pre"] == "default"
    assert f["tokenizer.ggml.add_space_prefix"] is True
    types, scores = f["tokenizer.ggml.token_type"], f["tokenizer.ggml.scores"]
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert types[3:259] == [gguf.TokenType.BYTE] * 256 and types[296:] == [gguf.TokenType.UNUSED] * 4
    # SentencePiece merges the highest score first: the merge order must survive as descending scores
    merged = [scores[tok.convert_tokens_to_ids(t)] for t in ("\u2581t", "he", "\u2581the", "\u2581dog")]
    assert merged == sorted(merged, reverse=True) and max(merged) < 0
    back = load_gguf_tokenizer(out)
    for text in ("the cat \u00c9dog", " the  dog", "  the", "hello\nworld", "cat"):
        # SentencePiece and llama.cpp put one "\u2581" before every text, even one starting with a space;
        # transformers' Metaspace tokenizer adds none there, so `tok(" " + text)` is the reference
        assert back(text).input_ids == tok(" " + text).input_ids, text
        assert back.decode(back(text).input_ids, skip_special_tokens=True) == text  # no space lost
    assert back(" the").input_ids != back("the").input_ids


def test_unsupported_tokenizers(tiny_hf_model, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    wordlevel = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")),
        unk_token="<unk>",
    )
    with pytest.raises(SnuggleError, match="supports BPE tokenizers.*not WordLevel"):
        _roundtrip_tokenizer(tiny_hf_model, tmp_path, wordlevel)
    src, _ = tiny_hf_model("llama", True, tmp_path, vocab_size=50)
    model, _ = snuggle.load(src, with_tokenizer=False)
    with pytest.raises(SnuggleError, match="97 tokens .* only 50 rows"):
        write_gguf(model, _byte_level(), tmp_path / "small.gguf")
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".*tmp*"))


# --- bad input and fallbacks ------------------------------------------------------------------------------


def test_bad_requests(tiny_hf_model, tmp_path: Path) -> None:
    src, _ = tiny_hf_model("llama", True, tmp_path)  # hidden 48: not a multiple of Q8_0's 32-wide blocks
    model, tok = snuggle.load(src)
    with pytest.raises(SnuggleError, match="unknown GGUF export dtype 'q4_k'"):
        write_gguf(model, tok, tmp_path / "x.gguf", "q4_k")
    with pytest.raises(SnuggleError, match="output directory does not exist"):
        write_gguf(model, tok, tmp_path / "nope" / "x.gguf")
    with pytest.raises(SnuggleError, match="is a directory"):
        write_gguf(model, tok, tmp_path)

    with pytest.warns(UserWarning, match=r"\d+ tensor\(s\) .* written as f16"):
        out = write_gguf(model, tok, tmp_path / "q8.gguf", "q8_0")
    assert set(_tensor_types(out).values()) == {Q.F32, Q.F16}

    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e5
    with pytest.raises(SnuggleError, match="up_proj.weight has values up to 1e\\+05, beyond float16's range"):
        write_gguf(model, tok, tmp_path / "q8.gguf", "f16")
    assert _tensor_types(tmp_path / "q8.gguf")  # the earlier file is untouched by the failed export
    write_gguf(model, tok, tmp_path / "wide.gguf", "bf16")  # bf16 has the range
    with torch.no_grad():
        model.model.norm.weight[3] = math.nan
    with pytest.raises(SnuggleError, match="model.norm.weight holds NaN or inf"):
        write_gguf(model, tok, tmp_path / "nan.gguf", "f32")
    assert not (tmp_path / "nan.gguf").exists() and not list(tmp_path.glob(".*tmp*"))


def test_mistral_sliding_window_warns(tiny_hf_model, tmp_path: Path) -> None:
    src, _ = tiny_hf_model("mistral", False, tmp_path)
    model, tok = snuggle.load(src)
    with pytest.warns(UserWarning, match="llama.cpp ignores the sliding window"):
        out = write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    assert _fields(out)["general.architecture"] == "llama"
    back, _ = snuggle.load(out, with_tokenizer=False)
    ids = _ids(model.args.vocab_size)[:, :4]  # within the 4-token window the two models agree exactly
    torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=1e-5)


# --- the real model ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_f16_roundtrip(smollm: Path, tmp_path: Path) -> None:
    model, tok = snuggle.load(smollm)
    out = write_gguf(model, tok, tmp_path / "smollm2-f16.gguf", "f16")
    back, back_tok = snuggle.load(out)

    prompt = "Il comando apt-get installa i pacchetti su Debian."
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ref, got = model(ids), back(ids)
    # f16 rounding of weights that were Q4_1/Q8_0 products: ~2e-3 of the logit range here
    assert (got - ref).abs().max() <= 5e-3 * ref.abs().max()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))

    for text in (
        prompt,
        "Hello world, ciao mondo 123!",
        "<|im_start|>user\nhi<|im_end|>",
        "  spazi\n\n\tè €",
    ):
        assert back_tok(text).input_ids == tok(text).input_ids, text
    assert back_tok.chat_template == tok.chat_template and "<|im_start|>" in back_tok.chat_template
    msgs = [{"role": "user", "content": "Ciao!"}]
    assert back_tok.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)

    keys = {
        "tokenizer.ggml.pre",
        "general.file_type",
        "llama.context_length",
        "llama.rope.freq_base",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
    }
    f, original = _skim_kv(out, keys), _skim_kv(smollm, keys)  # GGUFReader would decode 49k tokens
    # the source's pre-tokenizer name survives although transformers' tokenizer cannot tell it from gpt-2
    assert f["tokenizer.ggml.pre"] == "smollm" and f["general.file_type"] == 1
    for key in keys - {"general.file_type"}:
        assert f[key] == original[key], key


def test_the_cli_offers_every_export_dtype() -> None:
    from snuggle.cli import GGUF_DTYPES
    from snuggle.io.gguf_export import EXPORT_DTYPES

    assert sorted(GGUF_DTYPES) == sorted(
        EXPORT_DTYPES
    )  # spelled out in api.py so that parsing does not import gguf
