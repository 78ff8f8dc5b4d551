"""The kernels package: it imports without triton or a GPU, every kernel compiles for sm_90, and the
fresh-process rerun of these tests when triton was imported before the interpreter was set.

See harness.py for how the kernels run without a GPU (Triton's interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from harness import HAS_TRITON, IN_FRESH_PROCESS, _kernel_env, needs_triton  # noqa: F401 (_kernel_env: a fixture)

if HAS_TRITON:
    from snuggle.kernels import triton_available

pytestmark = pytest.mark.usefixtures("single_thread", "_kernel_env")


def test_import_and_noop_without_triton_or_interpreter():
    """`import snuggle.kernels` needs neither a GPU nor triton; then apply_fast_path changes nothing."""
    script = textwrap.dedent(
        """
        import sys
        import torch
        import snuggle.kernels as K
        from snuggle.model.args import ModelArgs
        from snuggle.model.decoder import Decoder, RMSNorm, rope_qk, swiglu
        from snuggle.model.loss import cross_entropy_sum

        def model():
            return Decoder(ModelArgs(model_type="llama", vocab_size=11, hidden_size=8, intermediate_size=8,
                                     num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4))

        def untouched(m, params):
            assert [(n, p) for n, p in m.named_parameters()] == params
            assert all(type(x) is RMSNorm for x in m.modules() if isinstance(x, RMSNorm))
            assert m.loss_fn is cross_entropy_sum
            assert m.model.layers[0].self_attn.rope_fn is rope_qk and m.model.layers[0].mlp.act_fn is swiglu

        m = model()
        params = list(m.named_parameters())
        if not torch.cuda.is_available():
            assert not K.triton_available()
            assert K.apply_fast_path(m) == []
            untouched(m, params)
        sys.modules["triton"] = None  # now as if triton were not installed
        K._triton_importable.cache_clear()
        assert not K.triton_available()
        m = model()
        params = list(m.named_parameters())
        assert K.apply_fast_path(m) == []
        untouched(m, params)
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@needs_triton
def test_triton_available_here():
    assert triton_available()


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_compile_for_hopper():
    """Every kernel, in every dtype and constexpr branch, compiles to an sm_90 cubin (Triton + ptxas).

    This needs no GPU, so a CPU run checks what the interpreter cannot: that the code is valid Triton for
    the compiler (types, control flow, pointer selects), not only for the Python interpreter. In a fresh
    process: once triton is imported under TRITON_INTERPRET=1 its own library functions cannot compile.
    """
    script = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from snuggle.kernels import linear_ce, nf4, rmsnorm, rope, swiglu

        F32 = {"W": "fp32", "RSTD": "fp32", "DW_PARTIAL": "fp32", "LOSS": "fp32", "SCALE": "fp32"}
        F32["LABELS"] = "i64"
        F32.update(CODES="u8", ABSMAX_Q="i8", ABSMAX_SCALE="fp32", ABSMAX_MEAN="fp32", LEVELS="fp32")
        cases = [
            (rmsnorm._rmsnorm_fwd_kernel, {"BLOCK_R": 1, "BLOCK_C": 4096}),
            (rmsnorm._rmsnorm_fwd_kernel, {"BLOCK_R": 16, "BLOCK_C": 128}),
            (rope._rope_kernel, {"BACKWARD": False, "BLOCK_R": 32, "BLOCK_D": 64}),
            (rope._rope_kernel, {"BACKWARD": True, "BLOCK_R": 64, "BLOCK_D": 32}),
            (swiglu._swiglu_fwd_kernel, {"BLOCK": 1024}),
            (swiglu._swiglu_bwd_kernel, {"BLOCK": 1024}),
            (linear_ce._ce_rows_kernel, {"COMPUTE_GRAD": True, "BLOCK_V": 4096}),
            (linear_ce._ce_rows_kernel, {"COMPUTE_GRAD": False, "BLOCK_V": 4096}),
            (linear_ce._scale_kernel, {"BLOCK": 2048}),
            (nf4._nf4_dequant_kernel, {"QBLOCK": 64, "QGROUP": 256, "BLOCKS": 32}),
        ] + [
            (rmsnorm._rmsnorm_bwd_kernel, {"COMPUTE_DX": dx, "COMPUTE_DW": dw, "BLOCK_R": r, "BLOCK_C": c})
            for dx, dw in ((True, True), (True, False), (False, True))
            for r, c in ((1, 4096), (16, 128))
        ]
        n = 0
        for fn, constexprs in cases:
            for dt in ("fp32", "bf16", "fp16"):
                # upper-case parameters are pointers (to `dt` unless listed), the rest i32 scalars
                sig = {}
                for p in fn.params:
                    if p.is_constexpr:
                        sig[p.name] = "constexpr"
                    elif p.name.isupper():
                        sig[p.name] = "*" + F32.get(p.name, dt)
                    else:
                        sig[p.name] = "fp32" if p.name == "eps" else "i32"
                src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
                out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
                assert out.asm.get("cubin"), (fn.__name__, dt, constexprs)
                n += 1
        print(n)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "48"


@pytest.mark.skipif(not (HAS_TRITON and IN_FRESH_PROCESS), reason="the kernel tests run in this process")
def test_kernels_in_a_fresh_process():
    """When another test module imported triton first (a whole-suite CPU run), rerun the kernel tests (this
    directory) on their own."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).parent), "-q", "-p", "no:cacheprovider"]
    cmd += ["-k", "not fresh_process and not compile_for_hopper and not noop_without_triton"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
