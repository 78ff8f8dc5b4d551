"""kernels/swiglu.py: SwiGLU, and SwiGLU inside the LoRA down projection (act_down), against the references.

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
    _lora_pair,
    _seed,
    assert_close,
    dtype_id,
    fn_name,
    gpu,
    needs_triton,
)
from torch import nn

if HAS_TRITON:
    from snuggle.kernels import reference
    from snuggle.kernels.swiglu import fast_act_down, fast_swiglu

pytestmark = pytest.mark.usefixtures("single_thread", "_kernel_env")


@needs_triton
class TestSwiGLU:
    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    @pytest.mark.parametrize("shape,inner", [((2, 5, 100), 16), ((3, 7, 72), 8)], ids=["100", "72"])
    def test_matches_reference_and_reuses_buffers(self, shape, inner, dtype):
        g = _seed(6)
        x0 = torch.randn(*shape[:-1], inner, generator=g).to(DEV, dtype)
        wg = (torch.randn(shape[-1], inner, generator=g) / inner**0.5).to(DEV, dtype)
        wu = (torch.randn(shape[-1], inner, generator=g) / inner**0.5).to(DEV, dtype)
        gy = torch.randn(shape, generator=g).to(DEV, dtype)

        def run(fn):
            x = x0.clone().requires_grad_(True)
            gate, up = x @ wg.t(), x @ wu.t()  # projection outputs: non-leaf, as in the MLP
            ptrs, seen = (gate.data_ptr(), up.data_ptr()), []
            gate.register_hook(lambda t: seen.append(t.data_ptr()))
            up.register_hook(lambda t: seen.append(t.data_ptr()))
            y = fn(gate, up)
            y.backward(gy)
            return y, x.grad, sorted(seen) == sorted(ptrs)

        y0, dx0, _ = run(reference.swiglu)
        y1, dx1, reused = run(fast_swiglu)
        assert "SwiGLUFunction" in fn_name(y1)
        assert reused, "d(gate), d(up) must be written into the gate and up buffers"
        assert_close(y1, y0, dtype, "y")
        assert_close(dx1, dx0, dtype, "dx")

    def test_leaves_keep_their_values_and_direct_grads(self):
        g = _seed(7)
        gate = torch.randn(4, 33, generator=g).to(DEV).requires_grad_(True)
        up = torch.randn(4, 33, generator=g).to(DEV).requires_grad_(True)
        before = gate.detach().clone(), up.detach().clone()
        d1 = torch.autograd.grad(fast_swiglu(gate, up).square().sum(), [gate, up])
        d0 = torch.autograd.grad(reference.swiglu(gate, up).square().sum(), [gate, up])
        assert torch.equal(gate.detach(), before[0]) and torch.equal(up.detach(), before[1])
        assert_close(d1[0], d0[0], F32, "dgate")
        assert_close(d1[1], d0[1], F32, "dup")

    def test_second_backward_raises(self):
        x = torch.randn(3, 8, device=DEV, requires_grad=True)
        y = fast_swiglu(x * 2, x * 3).sum()
        y.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


@needs_triton
class TestSwiGLUDown:
    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    @pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
    def test_matches_reference(self, bias, dtype):
        g = _seed(23)
        ref, fast = _lora_pair(38, 20, 4, bias, w_dtype=dtype)
        gate0 = torch.randn(3, 5, 38, generator=g).to(DEV, dtype)
        up0 = torch.randn(3, 5, 38, generator=g).to(DEV, dtype)
        gy = torch.randn(3, 5, 20, generator=g).to(DEV, dtype)
        results = []
        for act_down, down in ((lambda g, u, a, d: d(a(g, u)), ref), (fast_act_down, fast)):
            # gate/up as non-leaves (projection outputs), so the fused backward reuses their buffers
            gl, ul = gate0.clone().requires_grad_(True), up0.clone().requires_grad_(True)
            y = act_down(gl * 1, ul * 1, fast_swiglu, down)
            y.backward(gy)
            results.append([y, gl.grad, ul.grad, down.lora_A.grad, down.lora_B.grad])
            down.lora_A.grad = down.lora_B.grad = None
        assert "SwiGLUDownFunction" in fn_name(results[1][0])
        for name, a, e in zip(("y", "dgate", "dup", "dA", "dB"), results[1], results[0], strict=True):
            assert_close(a, e, dtype, name)

    def test_keeps_gate_and_up_not_their_product(self):
        _, fast = _lora_pair(36, 12, 4, bias=False)
        gate = torch.randn(2, 3, 36, device=DEV, requires_grad=True)
        up = torch.randn(2, 3, 36, device=DEV, requires_grad=True)
        y = fast_act_down(gate, up, fast_swiglu, fast)
        saved = [t for t in y.grad_fn.saved_tensors if t is not None]
        assert sorted(tuple(t.shape) for t in saved) == sorted(
            [(2, 3, 36), (2, 3, 36), (6, 4), (12, 36), (4, 36), (12, 4)]
        )
        # a plain down projection (no LoRA) or another activation: the unfused composition
        plain = nn.Linear(36, 12).to(DEV)
        assert "SwiGLUDownFunction" not in fn_name(fast_act_down(gate, up, fast_swiglu, plain))
        assert "SwiGLUDownFunction" not in fn_name(fast_act_down(gate, up, reference.swiglu, fast))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
class TestLargeShapesGPU:
    pytestmark = gpu

    @pytest.mark.parametrize("shape", [(2, 1023, 14336), (3, 257, 1000)])
    def test_swiglu(self, shape, dtype):
        g = _seed(22)
        gate0 = torch.randn(shape, generator=g).to(DEV, dtype)
        up0 = torch.randn(shape, generator=g).to(DEV, dtype)
        gy = torch.randn(shape, generator=g).to(DEV, dtype)
        outs = []
        for fn in (reference.swiglu, fast_swiglu):
            a, b = gate0.clone().requires_grad_(True), up0.clone().requires_grad_(True)
            ga, gb = a * 1, b * 1  # non-leaf, so the fast path reuses their buffers
            y = fn(ga, gb)
            y.backward(gy)
            outs.append((y, a.grad, b.grad))
        for name, a, e in zip(("y", "dgate", "dup"), outs[1], outs[0], strict=True):
            assert_close(a, e, dtype, name)
