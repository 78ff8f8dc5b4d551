"""kernels/linear_ce.py: the fused lm_head projection and cross-entropy against cross_entropy_sum.

See harness.py for how the kernels run without a GPU (Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch
from harness import (  # noqa: F401 (_kernel_env: a fixture)
    DEV,
    DTYPES,
    F32,
    HAS_TRITON,
    _kernel_env,
    _seed,
    assert_close,
    dtype_id,
    gpu,
    needs_triton,
)
from torch import nn

from snuggle.model.loss import IGNORE_INDEX

if HAS_TRITON:
    from snuggle.kernels import linear_ce, reference
    from snuggle.kernels.linear_ce import fused_linear_cross_entropy

pytestmark = pytest.mark.usefixtures("single_thread", "_kernel_env")


def _ce_inputs(B, T, C, V, dtype, g, ignore=3):
    h = torch.randn(B, T, C, generator=g).to(DEV, dtype)
    w = (torch.randn(V, C, generator=g) / C**0.5 * 2).to(DEV)  # fp32 weight; logits of a few units
    y = torch.randint(0, V, (B, T), generator=g)
    y.view(-1)[torch.randperm(B * T, generator=g)[:ignore]] = IGNORE_INDEX
    return h, w, y.to(DEV)


def _ce_run(fn, h0, w0, y, scale=0.37, w_trainable=True, **kw):
    h = h0.clone().requires_grad_(True)
    w = w0.clone().requires_grad_(w_trainable)
    loss = fn(h, w, y, **kw)
    (loss * scale).backward()  # a non-unit upstream gradient, as the trainer's 1/count gives
    return loss, h.grad, w.grad


@needs_triton
class TestLinearCrossEntropy:
    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    @pytest.mark.parametrize(
        "B,T,C,V,chunk",
        [(2, 9, 72, 1001, 7), (1, 13, 100, 1001, None), (2, 5, 16, 37, 3)],
        ids=["chunked-1001", "one-chunk-1001", "tiny-vocab"],
    )
    @pytest.mark.parametrize("drop_masked", [True, False], ids=["masked-rows-dropped", "no-host-sync"])
    def test_matches_reference(self, B, T, C, V, chunk, dtype, drop_masked, monkeypatch):
        # without dropping, masked rows go through the matmuls and the row kernel zeroes them
        monkeypatch.setattr(linear_ce, "DROP_MASKED_ROWS", drop_masked)
        h, w, y = _ce_inputs(B, T, C, V, dtype, _seed(8))
        l0, dh0, dw0 = _ce_run(reference.cross_entropy_sum, h, w, y)
        l1, dh1, dw1 = _ce_run(fused_linear_cross_entropy, h, w, y, chunk_tokens=chunk)
        assert l1.dtype == F32 and l1.dim() == 0
        # the fp32 lm_head under low-precision activations must train: nonzero and equal to the reference
        assert dw1 is not None and dw1.dtype == F32 and float(dw1.abs().max()) > 0
        assert dh1.dtype == dtype
        assert_close(l1, l0, dtype, "loss")
        assert_close(dh1, dh0, dtype, "dh")
        assert_close(dw1, dw0, dtype, "dW")
        masked = (y == IGNORE_INDEX).view(-1)
        assert float(dh1.reshape(-1, C)[masked].abs().max()) == 0.0

    def test_multi_block_vocab_rows(self, monkeypatch):
        """V spans several column blocks, the last one partial: the online log-sum-exp must be exact."""
        monkeypatch.setattr(linear_ce, "_MAX_BLOCK_V", 256)
        h, w, y = _ce_inputs(1, 6, 24, 1001, F32, _seed(9), ignore=1)
        l0, dh0, dw0 = _ce_run(reference.cross_entropy_sum, h, w, y)
        l1, dh1, dw1 = _ce_run(fused_linear_cross_entropy, h, w, y, chunk_tokens=4)
        assert_close(l1, l0, F32, "loss")
        assert_close(dh1, dh0, F32, "dh")
        assert_close(dw1, dw0, F32, "dW")

    def test_row_kernel_ignored_rows_and_in_place_gradient(self):
        g = _seed(10)
        logits = torch.randn(5, 77, generator=g).to(DEV)
        labels = torch.tensor([3, IGNORE_INDEX, 76, 0, IGNORE_INDEX], device=DEV)
        loss = torch.empty(5, device=DEV)
        buf = logits.clone()
        linear_ce.ce_rows(buf, labels, loss, compute_grad=True)
        valid = labels != IGNORE_INDEX
        lref = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        grad = torch.softmax(logits, -1) - torch.nn.functional.one_hot(labels.clamp_min(0), 77)
        grad[~valid] = 0
        assert_close(loss, lref, F32, "loss rows")
        assert_close(buf, grad, F32, "dlogits in place")

    def test_tied_embedding_gets_both_contributions(self):
        g = _seed(11)
        V, C = 101, 24
        emb = nn.Embedding(V, C).to(DEV)
        ids = torch.randint(0, V, (2, 7), generator=g).to(DEV)
        y = torch.randint(0, V, (2, 7), generator=g).to(DEV)
        grads = []
        for fn in (reference.cross_entropy_sum, fused_linear_cross_entropy):
            emb.weight.grad = None
            h = torch.tanh(emb(ids))  # the embedding is used twice: input lookup and lm_head
            fn(h, emb.weight, y).backward()
            grads.append(emb.weight.grad.clone())
        assert_close(grads[1], grads[0], F32, "tied dW")
        lookup_only = torch.zeros(V, dtype=torch.bool, device=DEV)
        lookup_only[ids.view(-1)] = True
        assert float(grads[1][~lookup_only].abs().max()) > 0  # rows the lookup never touched: lm_head's part

    def test_frozen_weight_skips_dw(self, monkeypatch):
        seen = []
        orig = linear_ce.linear_ce_forward

        def spy(h, w, y, need_dh, need_dw, chunk):
            seen.append((need_dh, need_dw))
            return orig(h, w, y, need_dh, need_dw, chunk)

        monkeypatch.setattr(linear_ce, "linear_ce_forward", spy)
        h, w, y = _ce_inputs(1, 5, 16, 37, F32, _seed(12))
        l0, dh0, dw0 = _ce_run(reference.cross_entropy_sum, h, w, y, w_trainable=False)
        l1, dh1, dw1 = _ce_run(fused_linear_cross_entropy, h, w, y, w_trainable=False)
        assert seen == [(True, False)] and dw1 is None and dw0 is None
        assert_close(dh1, dh0, F32, "dh")

    def test_no_grad_and_all_ignored(self):
        h, w, y = _ce_inputs(1, 5, 16, 37, F32, _seed(13))
        with torch.no_grad():
            assert_close(
                fused_linear_cross_entropy(h, w, y), reference.cross_entropy_sum(h, w, y), F32, "eval"
            )
        none = torch.full_like(y, IGNORE_INDEX)
        loss, dh, dw = _ce_run(fused_linear_cross_entropy, h, w, none)
        assert float(loss.detach()) == 0.0 and float(dh.abs().max()) == 0.0 and float(dw.abs().max()) == 0.0

    def test_second_backward_raises(self):
        h, w, y = _ce_inputs(1, 4, 8, 19, F32, _seed(14))
        h.requires_grad_(True)
        loss = fused_linear_cross_entropy(h, w, y)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
class TestLargeShapesGPU:
    pytestmark = gpu

    @pytest.mark.parametrize(
        "B,T,C,V,chunk",
        [(2, 1023, 576, 49153, None), (1, 2049, 1024, 32003, 500), (1, 300, 4096, 128256, None)],
    )
    def test_linear_cross_entropy(self, B, T, C, V, chunk, dtype):
        h, w, y = _ce_inputs(B, T, C, V, dtype, _seed(23), ignore=T // 5)
        l0, dh0, dw0 = _ce_run(reference.cross_entropy_sum, h, w, y)
        l1, dh1, dw1 = _ce_run(fused_linear_cross_entropy, h, w, y, chunk_tokens=chunk)
        assert float(dw1.abs().max()) > 0
        for name, a, e in (("loss", l1, l0), ("dh", dh1, dh0), ("dW", dw1, dw0)):
            assert_close(a, e, dtype, name)
