"""The Triton fast paths against their PyTorch references: outputs, every gradient, the swap, training.

Without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1), which executes every
program in Python: shapes here are tiny (odd sizes all the same) and the file takes about 20 s. The
interpreter needs triton imported in interpreter mode, so when another test module imported triton first
(a whole-suite run), this file reruns itself in a fresh process. Every kernel is also compiled to an sm_90
cubin, which needs no GPU. With CUDA the same tests run compiled on the GPU, and the `gpu`-marked ones add
large, odd shapes, a bigger model and a longer training run in fp32 and bf16. Without triton everything
skips, except the check that `snuggle.kernels` still imports and `apply_fast_path` does nothing."""

from __future__ import annotations

import os
import sys

# triton imported earlier in this process (transformers does, through torch._dynamo) was set up for the
# compiler: its own library functions then cannot run under the interpreter. See the fresh-process test.
_TRITON_PREIMPORTED = "triton" in sys.modules

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
if not CUDA:
    # before triton or snuggle.kernels is imported: @triton.jit picks the interpreter at decoration time
    os.environ["TRITON_INTERPRET"] = "1"

import copy  # noqa: E402
import subprocess  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from snuggle.config import LoraConfig  # noqa: E402
from snuggle.lora import LoRALinear, apply_lora  # noqa: E402
from snuggle.model.args import ModelArgs  # noqa: E402
from snuggle.model.checkpointing import configure_checkpointing  # noqa: E402
from snuggle.model.decoder import (  # noqa: E402
    Decoder,
    RMSNorm,
    gate_up_down,
    project,
    rope_cos_sin,
    rope_inv_freq,
)
from snuggle.model.loss import IGNORE_INDEX  # noqa: E402

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:
    HAS_TRITON = False

if HAS_TRITON:
    from snuggle.kernels import apply_fast_path, linear_ce, reference, rmsnorm, triton_available
    from snuggle.kernels.linear_ce import fused_linear_cross_entropy
    from snuggle.kernels.lora import FastLoRALinear, factor_grad, fast_project, lora_linear
    from snuggle.kernels.mlp import fast_gate_up_down
    from snuggle.kernels.rmsnorm import FastRMSNorm, fast_rms_norm
    from snuggle.kernels.rope import fast_rope_qk
    from snuggle.kernels.swiglu import fast_act_down, fast_swiglu

if not CUDA:
    # the kernels are bound now; the rest of the session (other test modules) must not see the variable,
    # or it would route their models through the interpreter. The fixture below sets it per test here.
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET

# the in-process kernel tests need triton, and on CPU an interpreter-mode triton (see the top)
IN_FRESH_PROCESS = not CUDA and _TRITON_PREIMPORTED
if not HAS_TRITON:
    needs_triton = pytest.mark.skipif(True, reason="triton is not installed")
else:
    needs_triton = pytest.mark.skipif(
        IN_FRESH_PROCESS,
        reason="triton was imported before the interpreter was set: run by test_kernels_in_a_fresh_process",
    )


@pytest.fixture
def _kernel_env(monkeypatch):
    if CUDA:
        # fp32 means fp32: TF32 matmuls would differ between chunked and unchunked paths by ~1e-3.
        # Set and restore by hand: torch exposes allow_tf32 through __getattr__, which monkeypatch
        # cannot undo (it tries delattr).
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if HAS_TRITON:
        _round_bf16_to_nearest(monkeypatch)
    yield


def _round_bf16_to_nearest(monkeypatch) -> None:
    """Make the interpreter's fp32 -> bf16 cast round to nearest even, as the GPU's (and torch's) does.

    Triton 3.6's interpreter truncates the mantissa instead: within one kernel that is one ulp, but it
    biases every rounding the same way, and over a whole bf16 model the bias is larger than the rounding
    noise the comparisons allow. Test-only: the kernels themselves are unchanged.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    orig = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(data).view(np.float32)).to(torch.bfloat16)
            return t.view(torch.int16).numpy().view(np.uint16)
        return orig(data, src, dst, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", convert)


pytestmark = pytest.mark.usefixtures("single_thread", "_kernel_env")

gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]

DEV = torch.device("cuda" if CUDA else "cpu")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = [F32, BF16, F16]


def dtype_id(dtype: torch.dtype) -> str:
    return {F32: "fp32", BF16: "bf16", F16: "fp16"}[dtype]


# (atol, rtol); atol is scaled by the reference's largest magnitude (a norm-wise bound), so cancellation
# in one element of a low-precision gradient is judged against the size of the tensor, not of that element
TOL = {F32: (1e-5, 1e-4), BF16: (2e-2, 2e-2), F16: (5e-3, 5e-3)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert actual.shape == expected.shape, what
    atol, rtol = TOL[dtype]
    a, e = actual.detach().float(), expected.detach().float()
    scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    torch.testing.assert_close(a, e, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


def fn_name(t: torch.Tensor) -> str:
    return type(t.grad_fn).__name__ if t.grad_fn is not None else ""


def _seed(s: int = 0) -> torch.Generator:
    torch.manual_seed(s)
    return torch.Generator(device="cpu").manual_seed(s)


# --------------------------------------------------------------------------------------------- package


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
    """When another test module imported triton first (a whole-suite CPU run), rerun this file on its own."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider"]
    cmd += ["-k", "not fresh_process and not compile_for_hopper and not noop_without_triton"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


# --------------------------------------------------------------------------------------------- RMSNorm


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


# --------------------------------------------------------------------------------------------- RoPE


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


# --------------------------------------------------------------------------------------------- SwiGLU


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


# --------------------------------------------------------------------------------------------- linear + CE


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


# --------------------------------------------------------------------------------------------- LoRA


def _lora_pair(n_in, n_out, r, bias, dropout=0.0, w_dtype=F32, rslora=False):
    base = nn.Linear(n_in, n_out, bias=bias)
    ref = LoRALinear(base, r=r, alpha=2 * r, dropout=dropout, rslora=rslora).to(DEV)
    with torch.no_grad():
        ref.lora_B.normal_(0, 0.2)  # B starts at zero; a nonzero B makes dA and dx's LoRA term visible
    ref.weight.data = ref.weight.data.to(w_dtype)
    if bias:
        ref.bias.data = ref.bias.data.to(w_dtype)
    return ref, FastLoRALinear.from_module(ref)


def _lora_grads(mod, x0, gy):
    x = x0.clone().requires_grad_(True)
    y = mod(x)
    y.backward(gy)
    out = [y, x.grad] + [p.grad for p in (mod.lora_A, mod.lora_B)]
    for p in mod.parameters():
        p.grad = None
    return out


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


def graph_names(t: torch.Tensor) -> set[str]:
    """Names of every autograd node behind t."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo += [nxt for nxt, _ in fn.next_functions]
    return names


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


# --------------------------------------------------------------------------------------------- NF4


def _nf4_base(ref, fast, dtype) -> None:
    """The reference and fused modules (sharing Parameters) both on one NF4 copy of ref's base weight."""
    from snuggle.quant.nf4 import NF4Weight

    nf4 = NF4Weight.from_dense(ref.weight.detach(), dtype=dtype)
    for m in (ref, fast):
        del m._parameters["weight"]
        m.weight = nf4


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


# --------------------------------------------------------------------------------------------- whole model


def tiny_decoder(
    tie: bool,
    seed: int = 0,
    hidden: int = 24,
    layers: int = 2,
    vocab: int = 101,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 10,
    inter: int = 40,
    dtype: torch.dtype = F32,
) -> Decoder:
    """A Qwen3-like Decoder (q/k norms, GQA, head_dim != hidden/heads, q/k/v bias) with LoRA + embeddings.

    Weights are drawn larger than the default init and every norm weight is perturbed, so the logits are
    far from uniform and a kernel that ignored a norm weight or a bias would fail the comparison.
    """
    args = ModelArgs(
        model_type="qwen3", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, qk_norm=True, attention_bias=True,
        tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Decoder(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0, 0.3 if "embed" in name else 1.5 / p.shape[1] ** 0.5)
            else:
                p.normal_(0, 0.1)
    model.to(DEV, dtype)
    model.compute_dtype = dtype
    apply_lora(model, LoraConfig(r=4, alpha=8, train_embeddings=True))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05)
    return model


def _batch(B: int, T: int, vocab: int, seed: int = 0):
    """Two packed documents a row, labels masked at each document's end (the packer's layout)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    cut = T // 2
    pos = torch.cat([torch.arange(cut), torch.arange(T - cut)]).expand(B, T).contiguous()
    doc = torch.cat([torch.zeros(cut, dtype=torch.long), torch.ones(T - cut, dtype=torch.long)]).expand(B, T)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    labels[:, cut - 1] = IGNORE_INDEX
    labels[:, -1] = IGNORE_INDEX
    return [t.to(DEV) for t in (ids, labels, pos, doc.contiguous())]


def _loss_and_grads(model, batch):
    for p in model.parameters():
        p.grad = None
    loss = model.loss_sum(*batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@needs_triton
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_swap_keeps_parameters_and_matches_the_reference(tie, dtype):
    ref = tiny_decoder(tie, dtype=dtype)
    fast = copy.deepcopy(ref)
    before = [(n, p) for n, p in fast.named_parameters()]
    state = list(fast.state_dict())
    swapped = apply_fast_path(fast)
    # every swap point of the model, and nothing else
    L = ref.args.num_layers
    norms = ["model.norm"] + [
        f"model.layers.{i}.{n}"
        for i in range(L)
        for n in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")
    ]
    loras = [
        f"model.layers.{i}.{p}.{n}"
        for i in range(L)
        for p, names in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        )
        for n in names
    ]
    fns = [
        f"model.layers.{i}.{fn}"
        for i in range(L)
        for fn in (
            "self_attn.rope_fn",
            "self_attn.project",
            "mlp.act_fn",
            "mlp.act_down",
            "mlp.project",
            "mlp.gate_up_down",
        )
    ]
    assert sorted(swapped) == sorted(norms + loras + fns + ["loss_fn"])
    assert [(n, p) for n, p in fast.named_parameters()] == before  # same names, same objects, same order
    assert list(fast.state_dict()) == state
    assert sum(isinstance(m, FastRMSNorm) for m in fast.modules()) == len(norms)
    assert sum(isinstance(m, FastLoRALinear) for m in fast.modules()) == len(loras)
    assert apply_fast_path(fast) == []  # idempotent
    if tie:
        assert fast.lm_head.weight is fast.model.embed_tokens.weight

    fast.model.layers[0].mlp.recompute_product = True  # one MLP through SwiGLUDownFunction, one not
    fast.model.layers[-1].recompute_norm = True  # one block's norms inside its LoRA groups, one not
    batch = _batch(2, 9, ref.args.vocab_size)
    loss = fast.loss_sum(*batch)
    assert "LinearCrossEntropyFunction" in fn_name(loss)
    fused = {"LoRAGroupFunctionBackward", "SwiGLUDownFunctionBackward", "SwiGLUFunctionBackward"}
    assert fused <= graph_names(loss)
    compare_models(fast, ref, batch, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
def test_mlps_keeping_only_their_input_match_the_reference(dtype):
    """`MLP.recompute_gate_up` on the fast path: one block's MLP as LoRAMLPFunction with its norm handed
    to it, one without, one as before; logits, loss and every gradient as the reference model's."""
    ref = tiny_decoder(tie=False, seed=2, layers=3, dtype=dtype)
    fast = copy.deepcopy(ref)
    assert "model.layers.0.mlp.gate_up_down" in apply_fast_path(fast)
    fast.model.layers[1].mlp.recompute_gate_up = True
    fast.model.layers[2].mlp.recompute_gate_up = True
    fast.model.layers[2].recompute_norm = True
    ref.model.layers[1].mlp.recompute_gate_up = True  # the reference's swap point: the same products
    batch = _batch(2, 9, ref.args.vocab_size)
    loss = fast.loss_sum(*batch)
    names = graph_names(loss)
    assert {"LoRAMLPFunctionBackward", "SwiGLUFunctionBackward"} <= names
    assert "LoRAMLPFunctionBackward" not in graph_names(ref.loss_sum(*batch))
    compare_models(fast, ref, batch, dtype)


def compare_models(fast: Decoder, ref: Decoder, batch, dtype: torch.dtype) -> None:
    """Logits, loss and every trainable gradient of `fast` against `ref` (same weights, same batch).

    In fp32 directly. In low precision both differ from exact arithmetic by rounding that compounds over
    the layers, so each is measured against an fp32 copy of the same weights (relative Frobenius error)
    and the fast path must be about as close to it as the reference is: within 2x, plus 2e-3.
    """
    with torch.no_grad():
        logits = [m(batch[0], batch[2], batch[3]) for m in (fast, ref)]
    l1, g1 = _loss_and_grads(fast, batch)
    l0, g0 = _loss_and_grads(ref, batch)
    assert g1.keys() == g0.keys() and all(g is not None for g in g1.values())
    if not ref.args.tie_word_embeddings:
        assert "lm_head.weight" in g1 and float(g1["lm_head.weight"].abs().max()) > 0
    pairs = [("logits", logits[0], logits[1]), ("loss", l1, l0)] + [(n, g1[n], g0[n]) for n in g0]
    if dtype == F32:
        for name, a, e in pairs:
            assert_close(a, e, F32, name)
        return
    exact = copy.deepcopy(ref).float()
    exact.compute_dtype = F32
    with torch.no_grad():
        truth = {"logits": exact(batch[0], batch[2], batch[3])}
    truth["loss"], grads = _loss_and_grads(exact, batch)
    truth.update(grads)
    for name, a, e in pairs:
        t = truth[name].float()
        err_fast = float((a.float() - t).norm() / t.norm())
        err_ref = float((e.float() - t).norm() / t.norm())
        assert err_fast <= 2 * err_ref + 2e-3, (
            f"{name}: fast off by {err_fast:.3g}, reference by {err_ref:.3g}"
        )


@needs_triton
@pytest.mark.parametrize(
    "mode", ["checkpoint", "offload", "every-saving", "saved-offload", "gate-up-saved-offload"]
)
def test_fast_path_under_activation_checkpointing(mode):
    """Recomputed blocks run RoPE (in place) and SwiGLU (buffer reuse) twice: gradients must not change.
    `every-saving`: as the memory plan's most frugal choice, with the norms inside the LoRA groups, the
    SwiGLU product made again, and the MLP (its norm with it) in tiles of 3 tokens. `saved-offload`: the
    first block keeps everything it saves (the fused Functions' tensors too) in host memory, the second
    is recomputed with its input offloaded, two steps (host buffers reused); `gate-up-saved-offload` the
    same with both MLPs keeping only their input (`recompute_gate_up`)."""
    ref = tiny_decoder(tie=False, seed=1)
    fast = copy.deepcopy(ref)
    apply_fast_path(fast)
    batch = _batch(1, 8, ref.args.vocab_size, seed=1)
    l0, g0 = _loss_and_grads(ref, batch)
    if mode in ("saved-offload", "gate-up-saved-offload"):
        configure_checkpointing(fast, 1, offload=True, offload_blocks=1)
        fast.saved_offloader.min_bytes = 0  # tiny shapes: offload every saved tensor
        for b in fast.model.layers:
            b.recompute_norm, b.mlp.recompute_product = True, True
            b.mlp.recompute_gate_up = mode == "gate-up-saved-offload"
        _loss_and_grads(fast, batch)
        assert fast.saved_offloader.host and not fast.saved_offloader.pending
    else:
        configure_checkpointing(fast, None, offload=mode != "checkpoint")
    if mode == "every-saving":
        for b in fast.model.layers:
            b.recompute_norm, b.mlp.recompute_product, b.mlp.tile_tokens = True, True, 3
    l1, g1 = _loss_and_grads(fast, batch)
    assert_close(l1, l0, F32, "loss")
    for name in g0:
        assert_close(g1[name], g0[name], F32, name)


def _train_curve(model, batch, steps: int, lr: float) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n_valid = int((batch[1] != IGNORE_INDEX).sum())
    curve = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model.loss_sum(*batch) / n_valid
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    return curve


@needs_triton
def test_training_curve_matches_reference():
    ref = tiny_decoder(tie=False, seed=2)
    fast = copy.deepcopy(ref)
    apply_fast_path(fast)
    head0 = fast.lm_head.weight.detach().clone()
    batch = _batch(1, 12, ref.args.vocab_size, seed=2)
    c0 = _train_curve(ref, batch, 50, 1e-2)
    c1 = _train_curve(fast, batch, 50, 1e-2)
    assert c0[-1] < 0.5 * c0[0]  # it learns
    torch.testing.assert_close(torch.tensor(c1), torch.tensor(c0), atol=1e-4, rtol=1e-3)
    assert not torch.equal(fast.lm_head.weight.detach(), head0)  # lm_head trained through the fused loss


# --------------------------------------------------------------------------------------------- GPU only


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

    @pytest.mark.parametrize("out,n_in", [(14336, 4096), (4096, 14336), (1023, 577)])
    def test_nf4_dequant(self, out, n_in, dtype):
        from snuggle.kernels.nf4 import dequantize_nf4
        from snuggle.quant.nf4 import dequantize_nf4_reference

        parts = _nf4_parts(out, n_in, 32, group=256)
        a = dequantize_nf4(**parts, in_features=n_in, dtype=dtype)
        e = dequantize_nf4_reference(**parts, in_features=n_in, dtype=dtype)
        assert_close(a, e, dtype, "dense")

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


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
def test_whole_model_and_training_gpu(dtype):
    """A bigger model in the trainer's layout (frozen weights in the compute dtype, trainables fp32)."""
    kw = dict(hidden=256, layers=4, vocab=5003, heads=8, kv_heads=2, head_dim=40, inter=688, dtype=dtype)
    ref = tiny_decoder(tie=True, seed=3, **kw)
    fast = copy.deepcopy(ref)
    apply_fast_path(fast)
    batch = _batch(4, 255, ref.args.vocab_size, seed=3)
    compare_models(fast, ref, batch, dtype)
    curves = [_train_curve(m, batch, 100, 2e-3) for m in (fast, ref)]
    assert curves[1][-1] < 0.5 * curves[1][0]  # it learns
    if dtype == F32:
        torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), atol=1e-3, rtol=1e-3)
        return
    # bf16 runs drift from exact training by rounding: the fast one may drift about as far as the reference
    exact = tiny_decoder(tie=True, seed=3, **kw).float()  # the same starting weights, exact arithmetic
    exact.compute_dtype = F32
    c32 = torch.tensor(_train_curve(exact, batch, 100, 2e-3))
    dev_fast = (torch.tensor(curves[0]) - c32).abs().max()
    dev_ref = (torch.tensor(curves[1]) - c32).abs().max()
    assert dev_fast <= 2 * dev_ref + 1e-2 * float(c32[0]), (float(dev_fast), float(dev_ref))


@needs_triton
def test_memory_plan_takes_the_fast_paths_elementwise_savings_first():
    from snuggle.train.memory import apply_memory_plan, plan_for_model

    ref = tiny_decoder(tie=False, seed=1)
    fast = copy.deepcopy(ref)
    apply_fast_path(fast)
    roomy = plan_for_model(fast, 2, 64, 80.0)
    assert (roomy.checkpoint_layers, roomy.recompute_product, roomy.recompute_norm) == (0, False, False)
    just_below = roomy.predicted_gib - 1e-9  # "nothing" no longer fits
    plan = plan_for_model(fast, 2, 64, just_below)
    assert (plan.checkpoint_layers, plan.recompute_product, plan.recompute_norm) == (0, True, False)
    plan = plan_for_model(fast, 2, 64, plan.predicted_gib - 1e-9)  # nor the product alone
    assert (plan.checkpoint_layers, plan.recompute_product, plan.recompute_norm) == (0, True, True)
    apply_memory_plan(fast, plan)
    assert all(b.recompute_norm and b.mlp.recompute_product for b in fast.model.layers)
    # the reference model has neither: the same budget costs a recomputed block
    plan = plan_for_model(ref, 2, 64, just_below)
    assert plan.checkpoint_layers > 0 and not (plan.recompute_product or plan.recompute_norm)


@needs_triton
def test_memory_plan_counts_no_kernel_savings_where_the_kernels_fall_back(monkeypatch):
    """A model on the CPU of a GPU machine has the fast path swapped in, but each swap point runs the
    reference beneath it (no Triton for CPU tensors without the interpreter), which keeps the SwiGLU
    product and the norms' outputs: the plan must not count those savings there."""
    from snuggle.train.memory import plan_for_model

    fast = tiny_decoder(tie=False, seed=1)
    apply_fast_path(fast)
    roomy = plan_for_model(fast, 2, 64, 80.0)
    plan = plan_for_model(fast, 2, 64, roomy.predicted_gib - 1e-9)
    assert plan.recompute_product and plan.checkpoint_layers == 0  # the kernels run (interpreter)
    # as on a GPU machine: triton importable, the fast path swapped in, the model on the CPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plan = plan_for_model(copy.deepcopy(fast).cpu(), 2, 64, roomy.predicted_gib - 1e-9)
    assert plan.checkpoint_layers > 0 and not (plan.recompute_product or plan.recompute_norm)
