"""kernels/lora.py: one LoRA projection, and LoRA groups that share an input (with their norm), against
the reference LoRALinear.

See harness.py for how the kernels run without a GPU (Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch
from harness import (  # noqa: F401 (_kernel_env: a fixture)
    BF16,
    CUDA,
    DEV,
    DTYPES,
    F16,
    F32,
    HAS_TRITON,
    _kernel_env,
    _lora_grads,
    _lora_pair,
    _seed,
    assert_close,
    dtype_id,
    fn_name,
    gpu,
    graph_names,
    needs_triton,
)

from snuggle.lora import LoRALinear
from snuggle.model.decoder import RMSNorm, project

if HAS_TRITON:
    from snuggle.kernels import reference
    from snuggle.kernels.lora import FastLoRALinear, factor_grad, fast_project, lora_linear
    from snuggle.kernels.rmsnorm import FastRMSNorm

pytestmark = pytest.mark.usefixtures("single_thread", "_kernel_env")


@needs_triton
class TestLoRA:
    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    @pytest.mark.parametrize(
        "n_in,n_out,r,bias", [(72, 100, 4, True), (100, 40, 8, False)], ids=["bias", "nobias"]
    )
    def test_matches_reference(self, n_in, n_out, r, bias, dtype):
        g = _seed(15)
        # frozen weight in the activation dtype, factors fp32: the trainer's layout
        ref, fast = _lora_pair(n_in, n_out, r, bias, w_dtype=dtype, rslora=not bias)
        x = torch.randn(2, 7, n_in, generator=g).to(DEV, dtype)
        gy = torch.randn(2, 7, n_out, generator=g).to(DEV, dtype)
        out0 = _lora_grads(ref, x, gy)
        out1 = _lora_grads(fast, x, gy)
        assert "LoRALinearFunction" in fn_name(out1[0])
        assert out1[2].dtype == F32 and out1[3].dtype == F32
        for name, a, e in zip(("y", "dx", "dA", "dB"), out1, out0, strict=True):
            assert_close(a, e, dtype, name)

    @pytest.mark.parametrize("dtype", [BF16, F16], ids=dtype_id)
    @pytest.mark.parametrize("scale", [1.0, 0.7])
    def test_factor_grad_is_the_scaled_product_in_the_factor_dtype(self, dtype, scale):
        """An fp32 factor's gradient from 16-bit operands (a transposed view, as dB = g^T xa): fp32 and
        the scaled product; on CUDA one fp32-output GEMM, so within fp32 rounding of the exact product,
        not 16-bit rounding; a 16-bit factor gets it in its own dtype."""
        g = _seed(41)
        a = torch.randn(300, 24, generator=g).to(DEV, dtype).t()  # (24, 300), K = 300 "tokens"
        b = torch.randn(300, 20, generator=g).to(DEV, dtype)
        exact = (a.double() @ b.double()) * scale
        got = factor_grad(a, b, scale, F32)
        assert got.dtype == F32 and got.shape == (24, 20)
        # on CPU the product is rounded to the operands' dtype first (the fallback)
        assert_close(got, exact, F32 if CUDA else dtype, "fp32 factor")
        low = factor_grad(a, b, scale, dtype)
        assert low.dtype == dtype
        assert_close(low, exact, dtype, "16-bit factor")

    def test_backward_keeps_no_output_sized_tensor(self):
        ref, fast = _lora_pair(24, 48, 4, bias=False)
        x = torch.randn(3, 5, 24, device=DEV, requires_grad=True)
        y = fast(x)
        saved = [t for t in y.grad_fn.saved_tensors if t is not None]
        # x (15, 24), x A^T (15, 4) and the parameters; nothing (15, 48), nothing (48, 24) but W itself
        assert sorted(tuple(t.shape) for t in saved) == sorted(
            [(15, 24), (15, 4), (48, 24), (4, 24), (48, 4)]
        )

    def test_trainable_base_weight_and_bias(self):
        g = _seed(16)
        ref, fast = _lora_pair(20, 12, 2, bias=True)
        ref.weight.requires_grad_(True)
        ref.bias.requires_grad_(True)
        x = torch.randn(4, 20, generator=g).to(DEV)
        gy = torch.randn(4, 12, generator=g).to(DEV)
        grads = []
        for mod in (ref, fast):
            mod(x).backward(gy)
            grads.append((ref.weight.grad.clone(), ref.bias.grad.clone()))
            ref.weight.grad = ref.bias.grad = None
        assert_close(grads[1][0], grads[0][0], F32, "dW")
        assert_close(grads[1][1], grads[0][1], F32, "db")

    def test_functional_form_and_dropout_fallback(self):
        g = _seed(17)
        ref, fast = _lora_pair(16, 8, 2, bias=True)
        x = torch.randn(3, 16, generator=g).to(DEV)
        y = lora_linear(x, ref.weight, ref.bias, ref.lora_A, ref.lora_B, ref.scale)
        assert_close(
            y, reference.lora_linear(x, ref.weight, ref.bias, ref.lora_A, ref.lora_B, ref.scale), F32
        )
        ref_d, fast_d = _lora_pair(16, 8, 2, bias=False, dropout=0.5)
        for mode in (True, False):
            ref_d.train(mode)
            fast_d.train(mode)
            torch.manual_seed(0)
            y0 = ref_d(x)
            torch.manual_seed(0)
            y1 = fast_d(x)
            assert ("LoRALinearFunction" in fn_name(y1)) == (not mode)
            if mode:
                assert torch.equal(y0, y1)  # the same reference path, the same dropout mask
            else:
                assert_close(y1, y0, F32, "eval")

    def test_from_module_shares_parameters(self):
        ref, fast = _lora_pair(8, 6, 2, bias=True)
        assert isinstance(fast, LoRALinear)
        assert [(n, id(p)) for n, p in fast.named_parameters()] == [
            (n, id(p)) for n, p in ref.named_parameters()
        ]
        assert fast.scale == ref.scale and fast.r == ref.r


def _group(n_in, outs, ranks, bias, dtype, rslora=(False,)):
    """LoRA projections of one input, reference modules and the fused path's modules (shared Parameters)."""
    refs = []
    for i, (o, r) in enumerate(zip(outs, ranks, strict=True)):
        ref, _ = _lora_pair(n_in, o, r, bias, w_dtype=dtype, rslora=rslora[i % len(rslora)])
        refs.append(ref)
    return refs, [FastLoRALinear.from_module(m) for m in refs]


def _group_grads(mods, x0, gys, project):
    x = x0.clone().requires_grad_(True)
    ys = project(mods, x)
    torch.autograd.backward(ys, gys)
    out = {"x": x.grad}
    for i, (m, y) in enumerate(zip(mods, ys, strict=True)):
        out[f"y{i}"] = y
        for name in ("lora_A", "lora_B", "weight", "bias"):
            p = getattr(m, name)
            if p is not None and p.requires_grad:
                out[f"{name}{i}"] = p.grad
                p.grad = None
    return out, ys


@needs_triton
class TestLoRAGroup:
    """q/k/v and gate/up as one Function: outputs and every gradient as the projections done one by one."""

    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    @pytest.mark.parametrize(
        "n_in,outs,ranks,bias,rslora",
        [(72, (100, 20, 20), (4, 4, 4), True, (False,)), (40, (56, 56), (8, 3), False, (True, False))],
        ids=["qkv-bias", "gate-up-mixed-rank-and-scale"],
    )
    def test_matches_separate_projections(self, n_in, outs, ranks, bias, rslora, dtype):
        g = _seed(21)
        refs, fasts = _group(n_in, outs, ranks, bias, dtype, rslora)
        x = torch.randn(2, 7, n_in, generator=g).to(DEV, dtype)
        gys = [torch.randn(2, 7, o, generator=g).to(DEV, dtype) for o in outs]
        want, _ = _group_grads(refs, x, gys, lambda mods, x: tuple(m(x) for m in mods))
        got, ys = _group_grads(fasts, x, gys, fast_project)
        assert all("LoRAGroupFunction" in fn_name(y) for y in ys)
        assert got.keys() == want.keys() and len(want) == 1 + 3 * len(outs)
        for name in want:
            assert_close(got[name], want[name], dtype, name)

    def test_trainable_base_weights(self):
        g = _seed(22)
        refs, fasts = _group(16, (12, 8), (2, 2), True, F32)
        for m in refs:
            m.weight.requires_grad_(True)
            m.bias.requires_grad_(True)
        x = torch.randn(5, 16, generator=g).to(DEV)
        gys = [torch.randn(5, o, generator=g).to(DEV) for o in (12, 8)]
        want, _ = _group_grads(refs, x, gys, lambda mods, x: tuple(m(x) for m in mods))
        got, _ = _group_grads(fasts, x, gys, fast_project)
        assert "weight0" in want and "bias1" in want
        for name in want:
            assert_close(got[name], want[name], F32, name)

    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    @pytest.mark.parametrize(
        "norm_trains,base_trains",
        [(False, False), (True, False), (False, True)],
        ids=["lora", "norm", "base"],
    )
    def test_norm_inside_matches_norm_then_projections(self, norm_trains, base_trains, dtype):
        """dA from x and the norm's statistics (no normalized copy made again); a trained base weight's dW
        from the normalized input made again."""
        g = _seed(24)
        n_in, outs = 72, (100, 20, 20)
        refs, fasts = _group(n_in, outs, (4, 4, 2), True, dtype)
        refs[1].weight.requires_grad_(base_trains)
        ref_norm = RMSNorm(n_in, 1e-5).to(DEV)
        with torch.no_grad():
            ref_norm.weight.copy_(1 + 0.3 * torch.randn(n_in, generator=g))
        ref_norm.weight.requires_grad_(norm_trains)
        fast_norm = FastRMSNorm.from_module(ref_norm)
        x = 3 * torch.randn(2, 7, n_in, generator=g).to(DEV, dtype)
        gys = [torch.randn(2, 7, o, generator=g).to(DEV, dtype) for o in outs]
        results = []
        for mods, norm, fn in ((refs, ref_norm, project), (fasts, fast_norm, fast_project)):
            got, ys = _group_grads(mods, x, gys, lambda mods, x, fn=fn, norm=norm: fn(mods, x, norm))
            if norm_trains:
                got["norm"], norm.weight.grad = norm.weight.grad, None
            results.append((got, ys))
        (want, _), (got, ys) = results
        assert all("LoRAGroupFunction" in fn_name(y) for y in ys)
        assert got.keys() == want.keys() and ("norm" in want) == norm_trains
        for name in want:
            assert_close(got[name], want[name], dtype, name)
        # kept: x itself (not its normalized copy) and the norm's (n,) statistics
        ys = fast_project(fasts, x.requires_grad_(True), fast_norm)
        saved = [t for t in ys[0].grad_fn.saved_tensors if t is not None and t.dim() >= 1]
        assert sum(t.shape == (14, n_in) for t in saved) == 1
        assert any(t.shape == (14,) and t.dtype == F32 for t in saved)

    def test_norm_with_hooks_or_ungrouped_runs_first(self):
        refs, fasts = _group(24, (48, 8), (4, 2), False, F32)
        norm = FastRMSNorm.from_module(RMSNorm(24, 1e-5).to(DEV))
        x = torch.randn(3, 5, 24, device=DEV, requires_grad=True)
        for mods in ([fasts[0], refs[1]], [fasts[0]]):  # no group: the norm's own Function, then each
            ys = fast_project(mods, x, norm)
            assert "RMSNormFunctionBackward" in graph_names(ys[0])
        hook = norm.register_forward_hook(lambda *a: None)
        ys = fast_project(fasts, x, norm)
        assert {"RMSNormFunctionBackward", "LoRAGroupFunctionBackward"} <= graph_names(ys[0])
        hook.remove()
        assert "RMSNormFunctionBackward" not in graph_names(fast_project(fasts, x, norm)[0])

    def test_keeps_x_once_and_falls_back(self):
        refs, fasts = _group(24, (48, 8), (4, 2), False, F32)
        x = torch.randn(3, 5, 24, device=DEV, requires_grad=True)
        ys = fast_project(fasts, x)
        saved = sorted(tuple(t.shape) for t in ys[0].grad_fn.saved_tensors if t is not None)
        # x (15, 24) once, x A_cat^T (15, 6), then W, A, B of each: nothing output-sized
        assert saved == sorted([(15, 24), (15, 6), (48, 24), (8, 24), (4, 24), (2, 24), (48, 4), (8, 2)])
        # anything but fused LoRA modules (here a reference module, or a lone projection) goes one by one
        for mods in ([fasts[0], refs[1]], [fasts[0]]):
            assert not any("LoRAGroupFunction" in fn_name(y) for y in fast_project(mods, x))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
class TestLargeShapesGPU:
    pytestmark = gpu

    @pytest.mark.parametrize("n_in,n_out,r", [(4096, 1024, 16), (576, 1536, 8)])
    def test_lora(self, n_in, n_out, r, dtype):
        g = _seed(24)
        ref, fast = _lora_pair(n_in, n_out, r, bias=True, w_dtype=dtype)
        x = torch.randn(2, 1023, n_in, generator=g).to(DEV, dtype)
        gy = torch.randn(2, 1023, n_out, generator=g).to(DEV, dtype)
        for name, a, e in zip(
            ("y", "dx", "dA", "dB"), _lora_grads(fast, x, gy), _lora_grads(ref, x, gy), strict=True
        ):
            assert_close(a, e, dtype, name)
