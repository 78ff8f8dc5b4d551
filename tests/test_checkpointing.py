"""Partial and offloaded activation checkpointing must not change the loss or any gradient."""

import pytest
import torch

from snuggle.config import LoraConfig
from snuggle.lora import apply_lora
from snuggle.model.args import ModelArgs
from snuggle.model.checkpointing import BlockActivationOffloader, _Saved, configure_checkpointing
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
    apply_lora(m, LoraConfig(r=4, alpha=8, dropout=dropout, train_embeddings=True))
    for mod in m.modules():
        if hasattr(mod, "lora_B"):
            torch.nn.init.normal_(mod.lora_B, std=0.1)  # B = 0 would hide wrong gradients of A
    return m


def _loss_and_grads(m: Decoder, ids, doc_ids, n_layers, offload, offload_blocks=0):
    configure_checkpointing(m, n_layers, offload, offload_blocks)
    if m.saved_offloader is not None:
        m.saved_offloader.min_bytes = 0  # the tiny model's tensors are all below the default threshold
    return _step(m, ids, doc_ids)


def _step(m: Decoder, ids, doc_ids):
    """One forward and backward with the model as configured."""
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


# --- blocks whose saved activations wait in CPU memory ---------------------------------------------


def _batch():
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    doc_ids = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    return ids, doc_ids


def _assert_same_grads(got, ref):
    assert got.keys() == ref.keys() and len(got) > 2
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    "n_layers,offload,offload_blocks",
    [(0, False, 1), (1, False, 1), (1, True, 2), (None, False, 1), (None, True, 1), (0, False, 3)],
)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_offloaded_blocks_keep_loss_and_gradients(n_layers, offload, offload_blocks, dropout, single_thread):
    m = _model(dropout)
    ids, doc_ids = _batch()
    ref_loss, ref = _loss_and_grads(m, ids, doc_ids, 0, False)
    assert m.saved_offloader is None
    loss, got = _loss_and_grads(m, ids, doc_ids, n_layers, offload, offload_blocks)
    assert torch.equal(loss, ref_loss)
    _assert_same_grads(got, ref)
    # the first offload_blocks blocks are offloaded, the next n_layers checkpointed
    n = 3 - offload_blocks if n_layers is None else min(n_layers, 3 - offload_blocks)
    assert m.checkpoint_layers == set(range(offload_blocks, offload_blocks + n))
    assert (m.offloader is not None) == (offload and n > 0)
    so = m.saved_offloader
    assert so is not None and so.layers == set(range(offload_blocks))
    # every offloaded block really kept host copies, and backward took them all back
    assert {layer for layer, _ in so.host} == set(range(offload_blocks))
    assert so.pending == {}


def test_offloaded_block_reuses_its_host_buffers_across_steps(single_thread):
    m = _model(0.2)
    ids, doc_ids = _batch()
    _, ref = _loss_and_grads(m, ids, doc_ids, 0, False)
    _, first = _loss_and_grads(m, ids, doc_ids, 1, False, offload_blocks=2)
    so = m.saved_offloader
    assert so.pending == {}
    buffers = {key: id(buf) for key, buf in so.host.items()}
    assert len(buffers) > 4
    _, second = _step(m, ids, doc_ids)
    assert m.saved_offloader is so and so.pending == {}
    assert {key: id(buf) for key, buf in so.host.items()} == buffers
    _assert_same_grads(first, ref)
    _assert_same_grads(second, ref)


def test_offloaded_block_holds_host_copies_until_backward(monkeypatch, single_thread):
    m = _model(0.0)
    ids, doc_ids = _batch()
    _, ref = _loss_and_grads(m, ids, doc_ids, 0, False)
    configure_checkpointing(m, 0, False, offload_blocks=2)
    so = m.saved_offloader
    so.min_bytes = 0

    # record what the offloader's pack hook is given and what it returns
    real_hooks = torch.autograd.graph.saved_tensors_hooks
    packed = []

    def spy(pack, unpack):
        def recording_pack(t):
            out = pack(t)
            packed.append((t, out))
            return out

        return real_hooks(recording_pack, unpack)

    m.zero_grad(set_to_none=True)
    with monkeypatch.context() as mp:
        mp.setattr(torch.autograd.graph, "saved_tensors_hooks", spy)
        loss = m.loss_sum(ids, ids, doc_ids=doc_ids)

    assert set(so.pending) == {0, 1}
    for i in (0, 1):
        handles = so.pending[i]
        assert isinstance(handles, list) and handles
        for h in handles:
            assert isinstance(h, _Saved) and h.layer == i
            assert h.host.device.type == "cpu" and h.device_copy is None
    # parameters (and views of them) are never copied: they stay on the device all step
    param_ptrs = {p.untyped_storage().data_ptr() for p in m.parameters()}
    offloaded = [t for t, out in packed if isinstance(out, _Saved)]
    # a tensor saved by several nodes is copied once
    handles = {id(out) for _, out in packed if isinstance(out, _Saved)}
    assert handles == {id(h) for i in (0, 1) for h in so.pending[i]}
    keys = {(t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride()) for t in offloaded}
    assert len(keys) == len(handles) < len(offloaded)
    for t, out in packed:
        if isinstance(t, torch.nn.Parameter) or t.untyped_storage().data_ptr() in param_ptrs:
            assert out is t
    assert all(t.untyped_storage().data_ptr() not in param_ptrs for t in offloaded)
    assert any(t.untyped_storage().data_ptr() in param_ptrs for t, _ in packed)  # the check saw weights

    loss.backward()
    assert so.pending == {}
    got = {k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad}
    _assert_same_grads(got, ref)


def test_small_tensors_stay_put_by_default(single_thread):
    m = _model(0.0)
    ids, doc_ids = _batch()
    configure_checkpointing(m, 0, False, offload_blocks=1)
    assert m.saved_offloader.min_bytes > 0
    _step(m, ids, doc_ids)
    assert m.saved_offloader.host == {} and m.saved_offloader.pending == {}


def _handles(layer: int, n: int = 2) -> list[_Saved]:
    return [_Saved(layer, torch.randn(3, 4)) for _ in range(n)]


def test_block_done_prefetches_the_highest_pending_block_into_freed_room():
    off = BlockActivationOffloader(torch.device("cpu"), range(3), [])
    assert off.layers == {0, 1, 2} and off.credit == 0
    pending = {i: _handles(i) for i in range(3)}
    off.pending = dict(pending)

    off.block_done(5, stored=True)  # a stored block's activations freed: room for one block
    assert set(off.pending) == {0, 1} and off.credit == 0
    for h in pending[2]:
        assert h.device_copy is not None and h.device_copy is not h.host
        assert torch.equal(h.device_copy, h.host)
    assert all(h.device_copy is None for i in (0, 1) for h in pending[i])

    off.block_done(4, stored=False)  # a recomputed block frees nothing
    assert set(off.pending) == {0, 1} and off.credit == 0
    assert all(h.device_copy is None for h in pending[1])

    off.block_done(3, stored=True)
    assert set(off.pending) == {0} and off.credit == 0
    assert all(h.device_copy is not None for h in pending[1])
    assert all(h.device_copy is None for h in pending[0])

    off.block_done(2, stored=True)
    off.block_done(1, stored=True)  # nothing left to fetch: the room is kept
    assert off.pending == {} and off.credit == 1
    assert all(h.device_copy is not None for h in pending[0])
    off.fetch(0)  # already fetched: nothing to do
    assert off.pending == {}

    # credit carries over to blocks offloaded later in the step, and a new step starts without any
    off.pending = {1: _handles(1)}
    off.block_done(0, stored=False)
    assert off.pending == {} and off.credit == 0
    off.block_done(0, stored=True)
    assert off.credit == 1
    with off.saving(0):
        pass
    assert off.credit == 0 and off.pending == {0: []}
    with off.saving(1):
        pass
    off.credit = 2
    with off.saving(1):  # not the first offloaded block: same step, credit kept
        pass
    assert off.credit == 2


@pytest.mark.parametrize(
    "n_layers,offload_blocks,done,fetched",
    [
        (0, 1, [(2, True), (1, True)], [0]),
        (1, 1, [(2, True), (1, False)], [0]),  # a recomputed block frees no room
        (0, 2, [(2, True), (1, True)], [1, 0]),  # the last offloaded block comes back first
    ],
)
def test_backward_reports_every_block_done_and_prefetches_into_its_room(
    n_layers, offload_blocks, done, fetched, monkeypatch, single_thread
):
    m = _model(0.0)
    ids, doc_ids = _batch()
    _, ref = _loss_and_grads(m, ids, doc_ids, 0, False)
    configure_checkpointing(m, n_layers, False, offload_blocks)
    so = m.saved_offloader
    so.min_bytes = 0
    calls, fetches, inside = [], [], []
    block_done, fetch = so.block_done, so.fetch

    def record_done(i, stored):
        calls.append((i, stored))
        inside.append(True)
        block_done(i, stored)
        inside.pop()

    def record_fetch(i):
        if i in so.pending:
            fetches.append((i, bool(inside)))
        fetch(i)

    monkeypatch.setattr(so, "block_done", record_done)
    monkeypatch.setattr(so, "fetch", record_fetch)
    _, got = _step(m, ids, doc_ids)
    assert calls == done
    # every offloaded block was prefetched by a block done, none waited for its first tensor in backward
    assert fetches == [(i, True) for i in fetched]
    assert so.pending == {}
    _assert_same_grads(got, ref)


def test_no_offloading_in_eval_or_generation(single_thread):
    m = _model(0.0)
    ids, _ = _batch()
    with torch.no_grad():
        ref = m(ids)
    configure_checkpointing(m, 1, False, offload_blocks=2)
    so = m.saved_offloader
    so.min_bytes = 0
    with torch.no_grad():
        out = m(ids)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert so.pending == {} and so.host == {}
