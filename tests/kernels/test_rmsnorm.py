"""kernels/rmsnorm.py against RMSNorm: output and every gradient, odd shapes, per-dtype tolerances.

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
from torch import nn

from snuggle.model.decoder import RMSNorm

if HAS_TRITON:
    from snuggle.kernels import reference, rmsnorm
    from snuggle.kernels.rmsnorm import FastRMSNorm, fast_rms_norm

pytestmark = pytest.mark.usefixtures("single_thread", "_kernel_env")


def _norm_pair(C: int, dtype_w: torch.dtype, trainable: bool, eps: float = 1e-6):
    ref = RMSNorm(C, eps).to(DEV)
    with torch.no_grad():
        ref.weight.copy_(1.0 + 0.5 * torch.randn(C))
    ref.weight.data = ref.weight.data.to(dtype_w)
    ref.weight.requires_grad_(trainable)
    return ref, FastRMSNorm.from_module(ref)


def _norm_grads(norm: nn.Module, x0: torch.Tensor, gy: torch.Tensor):
    x = x0.clone().requires_grad_(True)
    y = norm(x)
    y.backward(gy)
    dw = norm.weight.grad
    norm.weight.grad = None
    return y, x.grad, dw


@needs_triton
class TestRMSNorm:
    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    @pytest.mark.parametrize(
        "shape",
        [(2, 5, 72), (3, 7, 100), (1, 3, 576), (2, 3, 4, 16)],  # last: Qwen3 q_norm rows (B, T, H, head_dim)
        ids=["72", "100", "576", "qnorm16"],
    )
    def test_matches_reference(self, shape, dtype):
        g = _seed(1)
        ref, fast = _norm_pair(shape[-1], F32, trainable=True)  # fp32 weight under low-precision x
        x = torch.randn(shape, generator=g).to(DEV, dtype)
        gy = torch.randn(shape, generator=g).to(DEV, dtype)
        y0, dx0, dw0 = _norm_grads(ref, x, gy)
        y1, dx1, dw1 = _norm_grads(fast, x, gy)
        assert "RMSNormFunction" in fn_name(y1)
        assert y1.dtype == dtype and dw1.dtype == F32
        assert_close(y1, y0, dtype, "y")
        assert_close(dx1, dx0, dtype, "dx")
        assert_close(dw1, dw0, dtype, "dw")

    def test_frozen_weight_skips_the_reduction(self, monkeypatch):
        seen = []
        orig = rmsnorm.rmsnorm_backward

        def spy(*args):
            seen.append(args[-2:])  # (need_dx, need_dw)
            return orig(*args)

        monkeypatch.setattr(rmsnorm, "rmsnorm_backward", spy)
        ref, fast = _norm_pair(72, F32, trainable=False)
        x = torch.randn(2, 5, 72, device=DEV)
        gy = torch.randn(2, 5, 72, device=DEV)
        y0, dx0, dw0 = _norm_grads(ref, x, gy)
        y1, dx1, dw1 = _norm_grads(fast, x, gy)
        assert seen == [(True, False)] and dw0 is None and dw1 is None
        assert_close(dx1, dx0, F32, "dx")

    def test_from_module_shares_the_parameter(self):
        ref = RMSNorm(16, 1e-5)
        fast = FastRMSNorm.from_module(ref)
        assert isinstance(fast, RMSNorm) and fast.weight is ref.weight and fast.eps == 1e-5
        assert list(fast.state_dict()) == ["weight"]

    def test_weight_only_gradient_and_functional_form(self):
        g = _seed(2)
        w = (1 + torch.randn(40, generator=g)).to(DEV).requires_grad_(True)
        x = torch.randn(3, 40, generator=g).to(DEV)  # x needs no grad: only dw
        fast_rms_norm(x, w, 1e-6).square().sum().backward()
        dw1, w.grad = w.grad, None
        reference.rms_norm(x, w, 1e-6).square().sum().backward()
        assert_close(dw1, w.grad, F32, "dw")

    def test_cpu_tensors_fall_back_without_interpreter(self, monkeypatch):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        ref, fast = _norm_pair(8, F32, trainable=True)
        x = torch.randn(2, 8, requires_grad=True)
        y = fast.cpu()(x)
        assert "RMSNormFunction" not in fn_name(y)
        assert torch.equal(y, ref.cpu()(x))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
class TestLargeShapesGPU:
    pytestmark = gpu

    @pytest.mark.parametrize("shape", [(4, 1023, 576), (2, 2047, 4096), (1, 333, 8, 128)])
    def test_rmsnorm(self, shape, dtype):
        g = _seed(20)
        ref, fast = _norm_pair(shape[-1], F32, trainable=True)
        x = torch.randn(shape, generator=g).to(DEV, dtype)
        gy = torch.randn(shape, generator=g).to(DEV, dtype)
        for name, a, e in zip(
            ("y", "dx", "dw"), _norm_grads(fast, x, gy), _norm_grads(ref, x, gy), strict=True
        ):
            assert_close(a, e, dtype, name)
