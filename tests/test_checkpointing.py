"""Partial and offloaded activation checkpointing must not change the loss or any gradient."""

import pytest
import torch

from snuggle.lora import apply_lora
from snuggle.model.args import ModelArgs
from snuggle.model.checkpointing import configure_checkpointing
from snuggle.model.decoder import Decoder


def _model(dropout: float) -> Decoder:
    args = ModelArgs(
        model_type="llama",
        vocab_size=101,
        hidden_size=48,
        intermediate_size=80,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=12,
    )
    torch.manual_seed(0)
    m = Decoder(args)
    apply_lora(m, 4, 8, dropout=dropout, train_embeddings=True)
    for mod in m.modules():
        if hasattr(mod, "lora_B"):
            torch.nn.init.normal_(mod.lora_B, std=0.1)  # B = 0 would hide wrong gradients of A
    return m


def _loss_and_grads(m: Decoder, ids, doc_ids, n_layers, offload):
    configure_checkpointing(m, n_layers, offload)
    m.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # same dropout masks for every configuration
    loss = m.loss_sum(ids, ids, doc_ids=doc_ids)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("n_layers,offload", [(3, False), (1, False), (2, True), (None, True)])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_checkpointing_keeps_loss_and_gradients(n_layers, offload, dropout, single_thread):
    m = _model(dropout)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    doc_ids = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    ref_loss, ref = _loss_and_grads(m, ids, doc_ids, 0, False)
    loss, got = _loss_and_grads(m, ids, doc_ids, n_layers, offload)
    assert torch.equal(loss, ref_loss)
    assert got.keys() == ref.keys() and len(got) > 2
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)
    expected = set(range(3 if n_layers is None else n_layers))
    assert m.checkpoint_layers == expected
    assert (m.offloader is not None) == offload


def test_no_checkpointing_in_eval_or_generation(single_thread):
    m = _model(0.0)
    configure_checkpointing(m, None, True)
    ids = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        a = m(ids)
    configure_checkpointing(m, 0, False)
    with torch.no_grad():
        b = m(ids)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
