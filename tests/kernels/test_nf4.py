"""kernels/nf4.py: NF4 dequantization against dequantize_nf4_reference, and LoRA on an NF4 base.

See harness.py for how the kernels run without a GPU (Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch
from harness import (  # noqa: F401 (_kernel_env: a fixture)
    DEV,
    DTYPES,
    _kernel_env,
    _lora_grads,
    _lora_pair,
    _nf4_base,
    _seed,
    assert_close,
    dtype_id,
    fn_name,
    gpu,
    needs_triton,
)

pytestmark = pytest.mark.usefixtures("single_thread", "_kernel_env")


def _nf4_parts(out, n_in, seed, block=64, group=4):
    from snuggle.quant.nf4 import quantize_nf4

    w = torch.randn(out, n_in, generator=_seed(seed)) * 0.05
    return quantize_nf4(w.to(DEV), block, group)


@needs_triton
class TestNF4:
    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    @pytest.mark.parametrize("out,n_in", [(7, 67), (33, 130), (5, 1), (3, 1000), (1, 64)])
    def test_dequant_matches_reference(self, out, n_in, dtype):
        from snuggle.kernels.nf4 import dequantize_nf4
        from snuggle.quant.nf4 import dequantize_nf4_reference

        parts = _nf4_parts(out, n_in, 30)
        a = dequantize_nf4(**parts, in_features=n_in, dtype=dtype, block=64, group=4)
        e = dequantize_nf4_reference(**parts, in_features=n_in, dtype=dtype, block=64, group=4)
        assert a.dtype == dtype and a.shape == (out, n_in)
        assert_close(a, e, dtype, "dense")

    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    def test_lora_on_nf4_base_matches_reference(self, dtype):
        g = _seed(31)
        ref, fast = _lora_pair(100, 72, 4, bias=False)
        _nf4_base(ref, fast, dtype)
        x = torch.randn(2, 7, 100, generator=g).to(DEV, dtype)
        gy = torch.randn(2, 7, 72, generator=g).to(DEV, dtype)
        # no dense (72, 100) weight is kept for backward: it is dequantized again there
        y = fast(x.clone().requires_grad_(True))
        assert (72, 100) not in [tuple(t.shape) for t in y.grad_fn.saved_tensors if t is not None]
        out0, out1 = _lora_grads(ref, x.detach(), gy), _lora_grads(fast, x.detach(), gy)
        assert "LoRALinearFunction" in fn_name(out1[0])
        for name, a, e in zip(("y", "dx", "dA", "dB"), out1, out0, strict=True):
            assert_close(a, e, dtype, name)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
class TestLargeShapesGPU:
    pytestmark = gpu

    @pytest.mark.parametrize("out,n_in", [(14336, 4096), (4096, 14336), (1023, 577)])
    def test_nf4_dequant(self, out, n_in, dtype):
        from snuggle.kernels.nf4 import dequantize_nf4
        from snuggle.quant.nf4 import dequantize_nf4_reference

        parts = _nf4_parts(out, n_in, 32, group=256)
        a = dequantize_nf4(**parts, in_features=n_in, dtype=dtype)
        e = dequantize_nf4_reference(**parts, in_features=n_in, dtype=dtype)
        assert_close(a, e, dtype, "dense")
