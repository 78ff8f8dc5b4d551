"""kernels/rope.py against rope_qk: q and k rotated in place, packed documents' positions, gradients.

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
    fn_name,
    gpu,
    needs_triton,
)

from snuggle.model.args import ModelArgs
from snuggle.model.decoder import rope_cos_sin, rope_inv_freq

if HAS_TRITON:
    from snuggle.kernels import reference
    from snuggle.kernels.rope import fast_rope_qk

pytestmark = pytest.mark.usefixtures("single_thread", "_kernel_env")


def _qk(B, T, H, Hkv, D, dtype, g):
    """q, k as the attention makes them: transposed views of (B, T, heads * D) projections."""
    qp = torch.randn(B, T, H * D, generator=g).to(DEV, dtype).requires_grad_(True)
    kp = torch.randn(B, T, Hkv * D, generator=g).to(DEV, dtype).requires_grad_(True)
    return qp, kp


def _angles(B, T, D, dtype, g, packed: bool):
    args = ModelArgs(
        model_type="llama", vocab_size=8, hidden_size=D, intermediate_size=8, num_layers=1,
        num_heads=1, num_kv_heads=1, head_dim=D, rope_theta=500.0,
    )  # fmt: skip
    if packed:  # positions restart at document boundaries: every (b, t) has its own angle
        pos = torch.randint(0, 3 * T, (B, T), generator=g)
    else:
        pos = torch.arange(T).expand(B, T)
    return rope_cos_sin(rope_inv_freq(args).to(DEV), pos.to(DEV), dtype)


def _rope_run(fn, qp, kp, cos, sin, H, Hkv, D, gq, gk):
    B, T, _ = qp.shape
    q = (qp * 1).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D), non-leaf, non-contiguous
    k = (kp * 1).view(B, T, Hkv, D).transpose(1, 2)
    q_ptr, k_ptr = q.data_ptr(), k.data_ptr()
    qo, ko = fn(q, k, cos, sin)
    dq, dk = torch.autograd.grad((qo.float() * gq).sum() + (ko.float() * gk).sum(), [qp, kp])
    return qo, ko, dq, dk, (qo.data_ptr() == q_ptr and ko.data_ptr() == k_ptr)


@needs_triton
class TestRope:
    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    @pytest.mark.parametrize(
        "B,T,H,Hkv,D",
        [(2, 5, 4, 2, 40), (1, 7, 4, 4, 64), (2, 3, 6, 1, 8), (1, 9, 3, 3, 6)],
        ids=["gqa-40", "mha-64", "mqa-8", "odd-half-6"],
    )
    def test_matches_reference(self, B, T, H, Hkv, D, dtype):
        g = _seed(3)
        qp, kp = _qk(B, T, H, Hkv, D, dtype, g)
        cos, sin = _angles(B, T, D, dtype, g, packed=True)
        gq = torch.randn(B, H, T, D, generator=g).to(DEV)
        gk = torch.randn(B, Hkv, T, D, generator=g).to(DEV)
        q0, k0, dq0, dk0, _ = _rope_run(reference.rope_qk, qp, kp, cos, sin, H, Hkv, D, gq, gk)
        q1, k1, dq1, dk1, in_place = _rope_run(fast_rope_qk, qp, kp, cos, sin, H, Hkv, D, gq, gk)
        assert in_place, "q and k must be rotated in their own storage"
        assert "RopeFunction" in fn_name(q1)
        for name, a, e in (("q", q1, q0), ("k", k1, k0), ("dq", dq1, dq0), ("dk", dk1, dk0)):
            assert_close(a, e, dtype, name)

    def test_batch_broadcast_angles_and_leaf_inputs(self):
        g = _seed(4)
        B, T, H, Hkv, D = 2, 5, 2, 1, 12
        cos, sin = _angles(1, T, D, F32, g, packed=False)  # (1, T, D): shared by the batch
        q = torch.randn(B, H, T, D, generator=g).to(DEV).requires_grad_(True)  # leaves: must stay intact
        k = torch.randn(B, Hkv, T, D, generator=g).to(DEV).requires_grad_(True)
        q_before = q.detach().clone()
        q1, k1 = fast_rope_qk(q, k, cos, sin)
        q0, k0 = reference.rope_qk(q, k, cos, sin)
        assert torch.equal(q.detach(), q_before)
        assert_close(q1, q0, F32, "q")
        assert_close(k1, k0, F32, "k")
        (g1q, g1k) = torch.autograd.grad(q1.sum() + 2 * k1.sum(), [q, k])
        (g0q, g0k) = torch.autograd.grad(q0.sum() + 2 * k0.sum(), [q, k])
        assert_close(g1q, g0q, F32, "dq")
        assert_close(g1k, g0k, F32, "dk")

    def test_stale_use_of_the_unrotated_tensor_raises(self):
        """In place is safe only because nothing keeps pre-RoPE q; if something does, autograd says so."""
        qp = torch.randn(1, 3, 8, device=DEV, requires_grad=True)
        q = (qp * 1).view(1, 3, 1, 8).transpose(1, 2)
        k = torch.randn(1, 1, 3, 8, device=DEV)
        cos, sin = _angles(1, 3, 8, F32, _seed(5), packed=False)
        kept = q.sin()  # sin saves its input q for backward
        fast_rope_qk(q, k, cos, sin)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            kept.sum().backward()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
class TestLargeShapesGPU:
    pytestmark = gpu

    @pytest.mark.parametrize("B,T,H,Hkv,D", [(2, 1023, 32, 8, 128), (3, 257, 14, 2, 64), (1, 511, 10, 5, 40)])
    def test_rope(self, B, T, H, Hkv, D, dtype):
        g = _seed(21)
        qp, kp = _qk(B, T, H, Hkv, D, dtype, g)
        cos, sin = _angles(B, T, D, dtype, g, packed=True)
        gq = torch.randn(B, H, T, D, generator=g).to(DEV)
        gk = torch.randn(B, Hkv, T, D, generator=g).to(DEV)
        out0 = _rope_run(reference.rope_qk, qp, kp, cos, sin, H, Hkv, D, gq, gk)
        out1 = _rope_run(fast_rope_qk, qp, kp, cos, sin, H, Hkv, D, gq, gk)
        assert out1[4]
        for name, a, e in zip(("q", "k", "dq", "dk"), out1[:4], out0[:4], strict=True):
            assert_close(a, e, dtype, name)
