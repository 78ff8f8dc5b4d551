"""Packed-document attention through FlexAttention (the CUDA path) against SDPA with a boolean mask.

On CPU FlexAttention runs its eager reference, which is what makes this comparison possible here; the
compiled kernel is exercised by the GPU runs (benchmarks, trainer).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from snuggle.config import LoraConfig
from snuggle.lora import apply_lora
from snuggle.model.args import ModelArgs
from snuggle.model.decoder import Decoder
from snuggle.model.flex import document_block_mask, flex_attention

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _quiet_eager_flex():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        yield


def _model(window: int | None = None) -> Decoder:
    torch.manual_seed(0)
    cfg = dict(
        model_type="mistral" if window else "llama",
        hidden_size=64,  # head_dim 16: the compiled CUDA kernel's smallest
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=97,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        sliding_window=window,
    )
    m = Decoder(ModelArgs.from_hf(cfg))
    apply_lora(m, LoraConfig(r=4, alpha=8))
    for name, p in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return m


def _packed(B: int = 2, T: int = 45):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (B, T), generator=g)
    doc = torch.zeros(B, T, dtype=torch.long)
    doc[0, 12:] = 1
    doc[0, 30:] = 2
    doc[1, 40:] = 1
    pos = torch.cat([torch.arange((doc[b] == d).sum()) for b in range(B) for d in doc[b].unique()]).view(B, T)
    return ids, pos, doc


CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("window", [None, 5])
def test_flex_document_attention_equals_sdpa_mask(window):
    """Logits on CPU (eager FlexAttention has no backward there); loss and every gradient on CUDA."""
    ids, pos, doc = _packed()
    m = _model(window)
    with torch.no_grad():
        ref = m(ids, position_ids=pos, doc_ids=doc)
        m.attention = "flex"
        torch.testing.assert_close(m(ids, position_ids=pos, doc_ids=doc), ref, atol=1e-5, rtol=1e-5)
    if not CUDA:
        return
    losses, grads = [], []
    for impl in ("sdpa", "flex"):
        m = _model(window).cuda()
        m.attention = impl
        loss = m(
            *(t.cuda() for t in (ids,)),
            position_ids=pos.cuda(),
            doc_ids=doc.cuda(),
            labels=torch.roll(ids, -1, 1).cuda(),
        )
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-5)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-4, rtol=1e-3, msg=k)


def test_flex_kernel_on_gqa_heads_matches_masked_sdpa():
    B, H, Hkv, T, D = 2, 4, 2, 37, 8
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, Hkv, Hkv))
    doc = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [0] * 37])
    y = flex_attention(q, k, v, document_block_mask(doc))
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None] & (
        doc[:, None, :, None] == doc[:, None, None, :]
    )
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_rows_of_one_document_take_plain_causal_attention(monkeypatch):
    """A row that is one document needs no mask at all (SDPA's flash kernel on GPU): none is built."""
    import snuggle.model.decoder as decoder

    m = _model()
    ids = torch.randint(0, 97, (2, 20))
    built = []
    monkeypatch.setattr(decoder, "attention_mask", lambda doc, *a, **k: built.append(doc) or None)
    with torch.no_grad():
        m(ids, doc_ids=torch.zeros(2, 20, dtype=torch.long))
    assert built == [None]
