"""Our decoder against transformers (and our LoRA against PEFT) on tiny random models, in fp32.

Every family x tied/untied: logits, gradients, packed documents, KV-cache decoding and the training
loss must agree with the reference implementation to float32 round-off.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from snuggle import config as snuggle_config
from snuggle.errors import SnuggleError
from snuggle.load import load
from snuggle.lora import ALL_LINEAR, LoRALinear, apply_lora, merge_lora
from snuggle.model.decoder import KVCache
from snuggle.model.loss import IGNORE_INDEX, cross_entropy_sum

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # transformers deprecations raised inside peft
]

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
CASES = [pytest.param(f, t, id=f"{f}-{'tied' if t else 'untied'}") for f in FAMILIES for t in (False, True)]
ATOL = 1e-4


def _ours(path):
    model, _ = load(path, dtype=torch.float32, device="cpu", with_tokenizer=False)
    return model


def _ids(vocab: int, *shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


@pytest.mark.parametrize("family,tie", CASES)
def test_logits_match_transformers(tiny_hf_model, tmp_path, family, tie):
    path, hf = tiny_hf_model(family, tie, tmp_path)
    ours = _ours(path)
    ids = _ids(ours.args.vocab_size, 2, 13)  # 13 > mistral's window of 4, so the window matters
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_attention_bias_includes_o_proj(tiny_hf_model, tmp_path, family):
    """attention_bias=true gives Llama and Qwen3 a bias on o_proj too (transformers' modules); it was
    dropped with an 'ignored tensors' warning, and the logits were wrong."""
    path, hf = tiny_hf_model(family, False, tmp_path, attention_bias=True)
    assert any(n.endswith("o_proj.bias") for n, _ in hf.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no checkpoint tensor may be ignored
        ours = _ours(path)
    ids = _ids(ours.args.vocab_size, 2, 13)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)


def test_non_swiglu_activation_is_refused(tiny_hf_model, tmp_path):
    """The MLP is SwiGLU: a config whose hidden_act is not silu is refused by name, not run as silu
    (which gave other logits than transformers with no word said)."""
    path, _ = tiny_hf_model("llama", False, tmp_path, hidden_act="gelu_pytorch_tanh")
    with pytest.raises(SnuggleError, match="hidden_act 'gelu_pytorch_tanh'"):
        _ours(path)
    path, hf = tiny_hf_model("llama", False, tmp_path, hidden_act="swish")  # silu's other name
    ids = _ids(hf.config.vocab_size, 1, 7)
    with torch.no_grad():
        torch.testing.assert_close(_ours(path)(ids), hf(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family,tie", CASES)
def test_gradients_match_transformers(tiny_hf_model, tmp_path, family, tie):
    path, hf = tiny_hf_model(family, tie, tmp_path)
    ours = _ours(path)
    for p in ours.parameters():
        p.requires_grad_(True)
    hf.zero_grad()
    ids = _ids(ours.args.vocab_size, 2, 11)
    # a random projection of the logits reaches every parameter, the tied lm_head included
    proj = torch.randn(2, 11, ours.args.vocab_size, generator=torch.Generator().manual_seed(2))
    (hf(ids).logits * proj).sum().backward()
    (ours(ids) * proj).sum().backward()
    theirs = dict(hf.named_parameters())
    mine = dict(ours.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, p in mine.items():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family,tie", CASES)
def test_packed_documents_match_separate_runs(tiny_hf_model, tmp_path, family, tie):
    path, hf = tiny_hf_model(family, tie, tmp_path)
    ours = _ours(path)
    V = ours.args.vocab_size
    doc_a, doc_b, doc_c = _ids(V, 1, 5, seed=3), _ids(V, 1, 7, seed=4), _ids(V, 1, 12, seed=5)
    # row 0 packs two documents; row 1 is one document, so the mask is per row, not shared
    ids = torch.cat([torch.cat([doc_a, doc_b], 1), doc_c])
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    position_ids = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])
    with torch.no_grad():
        got = ours(ids, position_ids=position_ids, doc_ids=doc_ids)
        refs = [hf(d).logits[0] for d in (doc_a, doc_b, doc_c)]
    torch.testing.assert_close(got[0, :5], refs[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[0, 5:], refs[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], refs[2], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family,tie", CASES)
def test_kv_cache_decoding_matches_full_forward(tiny_hf_model, tmp_path, family, tie):
    path, _ = tiny_hf_model(family, tie, tmp_path)
    ours = _ours(path)
    if ours.args.sliding_window is not None:
        # keep the whole sequence within the window; see test_kv_cache_respects_sliding_window
        ours.args.sliding_window = 64
    ids = _ids(ours.args.vocab_size, 2, 10)
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache()
        steps = [ours(ids[:, :4], cache=cache)]  # prefill
        for t in range(4, ids.shape[1]):
            steps.append(ours(ids[:, t : t + 1], cache=cache))
    assert cache.length() == ids.shape[1]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)


def test_kv_cache_respects_sliding_window(tiny_hf_model, tmp_path):
    path, hf = tiny_hf_model("mistral", False, tmp_path)  # sliding_window = 4
    ours = _ours(path)
    ids = _ids(ours.args.vocab_size, 1, 9)
    with torch.no_grad():
        ref = hf(ids).logits
        cache = KVCache()
        steps = [ours(ids[:, :3], cache=cache)]
        for t in range(3, ids.shape[1]):
            steps.append(ours(ids[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("first_sliding", [1, 28], ids=["mixed", "none-sliding"])
def test_qwen_sliding_window_applies_to_its_layers_only(tiny_hf_model, tmp_path, family, first_sliding):
    """Qwen with use_sliding_window windows only the layers from max_window_layers on (transformers'
    layer_types); the window used to be applied to every layer, wrong logits for either config."""
    path, hf = tiny_hf_model(
        family, False, tmp_path, use_sliding_window=True, sliding_window=4, max_window_layers=first_sliding
    )
    ours = _ours(path)
    assert ours.args.layer_window(0) is None
    assert ours.args.layer_window(1) == (4 if first_sliding == 1 else None)
    ids = _ids(ours.args.vocab_size, 2, 13)
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(ours(ids), ref, atol=ATOL, rtol=0)
        cache = KVCache()
        steps = [ours(ids[:1, :3], cache=cache)]
        for t in range(3, ids.shape[1]):
            steps.append(ours(ids[:1, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), ref[:1], atol=ATOL, rtol=0)


def test_kv_cache_multi_token_continuation(tiny_hf_model, tmp_path):
    path, hf = tiny_hf_model("llama", False, tmp_path)
    ours = _ours(path)
    ids = _ids(ours.args.vocab_size, 1, 9)
    with torch.no_grad():
        ref = hf(ids).logits
        cache = KVCache()
        got = torch.cat([ours(ids[:, :3], cache=cache), ours(ids[:, 3:], cache=cache)], 1)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family,tie", CASES)
def test_loss_sum_matches_transformers_loss(tiny_hf_model, tmp_path, family, tie):
    path, hf = tiny_hf_model(family, tie, tmp_path)
    ours = _ours(path)
    ids = _ids(ours.args.vocab_size, 2, 12)
    hf_labels = ids.clone()
    hf_labels[0, 3:6] = IGNORE_INDEX
    hf_labels[1, -2:] = IGNORE_INDEX
    # transformers shifts inside; ours are aligned: labels[t] is the target of position t
    aligned = torch.cat([hf_labels[:, 1:], torch.full((2, 1), IGNORE_INDEX)], 1)
    n_valid = int((aligned != IGNORE_INDEX).sum())
    assert 0 < n_valid < aligned.numel() - 2
    with torch.no_grad():
        ref = hf(ids, labels=hf_labels).loss * n_valid
        got = ours.loss_sum(ids, aligned)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)


def _chunked_vs_plain(hidden_fn, weight: torch.Tensor, labels: torch.Tensor, params: list[torch.Tensor]):
    results = []
    for chunk in (None, 3):  # 3 divides neither the token count nor the valid count
        for p in params:
            p.grad = None
        loss = cross_entropy_sum(hidden_fn(), weight, labels, chunk_tokens=chunk)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    (plain, plain_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-6)
    for a, b in zip(chunked_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_chunked_loss_matches_plain():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(37, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 37, (2, 7), generator=g)
    labels[0, 2] = labels[1, :3] = IGNORE_INDEX
    _chunked_vs_plain(lambda: hidden, weight, labels, [hidden, weight])


def test_chunked_loss_with_tied_trainable_weight(tiny_hf_model, tmp_path):
    path, _ = tiny_hf_model("llama", True, tmp_path)
    ours = apply_lora(_ours(path), snuggle_config.LoraConfig(r=2, alpha=4, train_embeddings=True))
    emb = ours.model.embed_tokens.weight
    assert emb is ours.lm_head.weight and emb.requires_grad
    ids = _ids(ours.args.vocab_size, 2, 9)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], 1)
    labels[1, 4] = IGNORE_INDEX
    # the tied matrix gets gradient through the embedding lookup and the projection: both must agree
    lora_a = ours.model.layers[0].self_attn.q_proj.lora_A
    _chunked_vs_plain(lambda: ours.hidden_states(ids), emb, labels, [emb, lora_a])


def test_loss_with_no_valid_tokens_is_zero_and_connected():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss = cross_entropy_sum(hidden, weight, torch.full((1, 4), IGNORE_INDEX), chunk_tokens=2)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad is not None and not hidden.grad.any()


def _lora_pair(path, hf, r: int, alpha: float, rslora: bool):
    """Our model and a PEFT model with the same random A and B (B nonzero, so the adapters matter)."""
    from peft import LoraConfig, get_peft_model

    ours = apply_lora(
        _ours(path), snuggle_config.LoraConfig(r=r, alpha=alpha, rslora=rslora, targets="all-linear")
    )
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0, target_modules=list(ALL_LINEAR)
    )
    peft_model = get_peft_model(hf, cfg).eval()
    peft_params = dict(peft_model.named_parameters())
    g = torch.Generator().manual_seed(7)
    n = 0
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0.0, 0.2, generator=g)
                peft_params[f"base_model.model.{name}.lora_A.default.weight"].copy_(m.lora_A)
                peft_params[f"base_model.model.{name}.lora_B.default.weight"].copy_(m.lora_B)
                n += 1
    assert n == len(ALL_LINEAR) * ours.args.num_layers
    return ours, peft_model


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("family,tie", CASES)
def test_lora_matches_peft_and_merges(tiny_hf_model, tmp_path, family, tie, rslora):
    path, hf = tiny_hf_model(family, tie, tmp_path)
    with torch.no_grad():
        base = hf(_ids(hf.config.vocab_size, 2, 10)).logits
    ours, peft_model = _lora_pair(path, hf, r=4, alpha=8.0, rslora=rslora)
    ids = _ids(ours.args.vocab_size, 2, 10)
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
        got = ours(ids)
        # the adapter must change the output, or the comparison above proves nothing
        assert (ref - base).abs().max() > 10 * ATOL
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
        merged = merge_lora(ours)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(ids), got, atol=ATOL, rtol=0)
