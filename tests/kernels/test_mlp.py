"""kernels/mlp.py: the whole LoRA MLP as one Function that keeps only its input, against the reference.

See harness.py for how the kernels run without a GPU (Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch
from harness import (  # noqa: F401 (_kernel_env: a fixture)
    BF16,
    DEV,
    DTYPES,
    F32,
    HAS_TRITON,
    _kernel_env,
    _lora_pair,
    _nf4_base,
    _seed,
    assert_close,
    dtype_id,
    fn_name,
    gpu,
    graph_names,
    needs_triton,
)

from snuggle.model.decoder import RMSNorm, gate_up_down

if HAS_TRITON:
    from snuggle.kernels import reference
    from snuggle.kernels.lora import FastLoRALinear
    from snuggle.kernels.mlp import fast_gate_up_down
    from snuggle.kernels.rmsnorm import FastRMSNorm
    from snuggle.kernels.swiglu import fast_swiglu

pytestmark = pytest.mark.usefixtures("single_thread", "_kernel_env")


def _mlp(n_in, inter, ranks, bias, dtype, rslora=(False,)):
    """gate, up, down LoRA projections: reference modules and the fused path's (shared Parameters)."""
    refs = []
    for i, ((o, k), r) in enumerate(zip(((inter, n_in), (inter, n_in), (n_in, inter)), ranks, strict=True)):
        ref, _ = _lora_pair(k, o, r, bias, w_dtype=dtype, rslora=rslora[i % len(rslora)])
        refs.append(ref)
    return refs, [FastLoRALinear.from_module(m) for m in refs]


def _mlp_grads(mods, norm, x0, gy, fn):
    """Output, dx and every trainable gradient (LoRA factors, trained base weights and biases, the norm)."""
    x = x0.clone().requires_grad_(True)
    y = fn(mods, x, norm)
    y.backward(gy)
    out = {"y": y, "x": x.grad}
    for i, m in enumerate(mods):
        for name in ("lora_A", "lora_B", "weight", "bias"):
            p = getattr(m, name)
            if isinstance(p, torch.Tensor) and p.requires_grad:
                out[f"{name}{i}"], p.grad = p.grad, None
    if norm is not None and norm.weight.requires_grad:
        out["norm"], norm.weight.grad = norm.weight.grad, None
    return out


@needs_triton
class TestLoRAMLP:
    """The whole MLP as one Function that keeps only its input: as the group and SwiGLU-down Functions."""

    @staticmethod
    def ref_mlp(mods, x, norm):
        return gate_up_down(mods, x, reference.swiglu, norm)

    @staticmethod
    def fast_mlp(mods, x, norm):
        return fast_gate_up_down(mods, x, fast_swiglu, norm)

    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    @pytest.mark.parametrize(
        "norm_kind,bias,base_trains",
        [("none", False, False), ("frozen", True, False), ("trained", False, True)],
        ids=["no-norm", "norm-bias", "trained-norm-and-base"],
    )
    def test_matches_reference(self, norm_kind, bias, base_trains, dtype):
        g = _seed(25)
        n_in, inter = 72, 100  # neither a power of two
        refs, fasts = _mlp(n_in, inter, (4, 3, 5), bias, dtype, rslora=(True, False))
        refs[1].weight.requires_grad_(base_trains)  # up: full fine-tuning through the Function
        ref_norm = fast_norm = None
        if norm_kind != "none":
            ref_norm = RMSNorm(n_in, 1e-5).to(DEV)
            with torch.no_grad():
                ref_norm.weight.copy_(1 + 0.3 * torch.randn(n_in, generator=g))
            ref_norm.weight.requires_grad_(norm_kind == "trained")
            fast_norm = FastRMSNorm.from_module(ref_norm)
        x = 3 * torch.randn(2, 7, n_in, generator=g).to(DEV, dtype)
        gy = torch.randn(2, 7, n_in, generator=g).to(DEV, dtype)
        want = _mlp_grads(refs, ref_norm, x, gy, self.ref_mlp)
        got = _mlp_grads(fasts, fast_norm, x, gy, self.fast_mlp)
        assert got.keys() == want.keys() and len(want) == 2 + 6 + base_trains + (norm_kind == "trained")
        for name in want:
            assert_close(got[name], want[name], dtype, name)
        y = self.fast_mlp(fasts, x.requires_grad_(True), fast_norm)
        assert "LoRAMLPFunction" in fn_name(y)

    def test_keeps_only_the_input_and_low_rank_products(self):
        refs, fasts = _mlp(24, 36, (4, 2, 3), False, F32)
        norm = FastRMSNorm.from_module(RMSNorm(24, 1e-5).to(DEV))
        x = torch.randn(3, 5, 24, device=DEV, requires_grad=True)
        y = self.fast_mlp(fasts, x, norm)
        saved = [tuple(t.shape) for t in y.grad_fn.saved_tensors if t is not None and t.dim() == 2]
        # x (15, 24), x A^T for gate and up (15, 6), h A_down^T (15, 3), the weights and factors:
        # nothing intermediate-sized per token (no gate, up or product)
        assert sorted(s for s in saved if s[0] == 15) == [(15, 3), (15, 6), (15, 24)]
        assert sorted(s for s in saved if s[0] != 15) == sorted(
            [(36, 24), (36, 24), (24, 36), (4, 24), (2, 24), (3, 36), (36, 4), (36, 2), (24, 3)]
        )

    def test_falls_back_to_the_pieces(self):
        g = _seed(26)
        refs, fasts = _mlp(24, 36, (4, 2, 3), True, F32)
        x = torch.randn(2, 3, 24, generator=g).to(DEV)
        gy = torch.randn(2, 3, 24, generator=g).to(DEV)
        want = _mlp_grads(refs, None, x, gy, self.ref_mlp)
        for mods, act in (([fasts[0], fasts[1], refs[2]], fast_swiglu), (fasts, reference.swiglu)):
            y = fast_gate_up_down(mods, x.clone().requires_grad_(True), act)
            assert "LoRAMLPFunction" not in graph_names(y)
            got = _mlp_grads(mods, None, x, gy, lambda m, x, n, act=act: fast_gate_up_down(m, x, act, n))
            for name in want:
                assert_close(got[name], want[name], F32, name)

    @pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
    def test_nf4_base_weights(self, dtype):
        g = _seed(27)
        refs, fasts = _mlp(64, 128, (4, 4, 4), False, dtype)
        for ref, fast in zip(refs, fasts, strict=True):
            _nf4_base(ref, fast, dtype)
        x = torch.randn(2, 5, 64, generator=g).to(DEV, dtype)
        gy = torch.randn(2, 5, 64, generator=g).to(DEV, dtype)
        want = _mlp_grads(refs, None, x, gy, self.ref_mlp)
        got = _mlp_grads(fasts, None, x, gy, self.fast_mlp)
        assert got.keys() == want.keys()
        for name in want:
            assert_close(got[name], want[name], dtype, name)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
class TestLargeShapesGPU:
    pytestmark = gpu

    @pytest.mark.parametrize("n_in,inter,r", [(4096, 14336, 16), (576, 1536, 8)])
    def test_mlp_keeping_only_its_input(self, n_in, inter, r, dtype):
        g = _seed(25)
        refs, fasts = _mlp(n_in, inter, (r, r, r), False, dtype)
        ref_norm = RMSNorm(n_in, 1e-5).to(DEV)
        fast_norm = FastRMSNorm.from_module(ref_norm)
        x = torch.randn(2, 1023, n_in, generator=g).to(DEV, dtype)
        gy = torch.randn(2, 1023, n_in, generator=g).to(DEV, dtype)
        want = _mlp_grads(refs, ref_norm, x, gy, TestLoRAMLP.ref_mlp)
        got = _mlp_grads(fasts, fast_norm, x, gy, TestLoRAMLP.fast_mlp)
        for name in want:
            assert_close(got[name], want[name], dtype, name)
