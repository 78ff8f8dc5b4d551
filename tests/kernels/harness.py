"""What every kernel test shares: the interpreter set up before triton is imported, tolerances, helpers.

Without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1), which executes every
program in Python: shapes here are tiny (odd sizes all the same) and the kernel tests take about 20 s.
The interpreter needs triton imported in interpreter mode, so when another test module imported triton
first (a whole-suite run), test_package.py reruns the kernel tests in a fresh process. Every kernel is
also compiled to an sm_90 cubin, which needs no GPU. With CUDA the same tests run compiled on the GPU,
and the `gpu`-marked ones add large, odd shapes, a bigger model and a longer training run in fp32 and
bf16. Without triton everything skips, except the check that `snuggle.kernels` still imports and
`apply_fast_path` does nothing.

Imported first by every test module here: the kernel modules are bound (decorated) below, while the
interpreter is set; the tests import their names after.
"""

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


import pytest  # noqa: E402
from torch import nn  # noqa: E402

from snuggle.config import LoraConfig  # noqa: E402
from snuggle.lora import LoRALinear, apply_lora  # noqa: E402
from snuggle.model.args import ModelArgs  # noqa: E402
from snuggle.model.decoder import Decoder  # noqa: E402

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:
    HAS_TRITON = False

if HAS_TRITON:
    # every kernel module is bound (decorated) here, while the interpreter is set: the test modules
    # import their names after this
    from snuggle.kernels import linear_ce, lora, mlp, rmsnorm, rope, swiglu  # noqa: F401
    from snuggle.kernels.lora import FastLoRALinear

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


def _nf4_base(ref, fast, dtype) -> None:
    """The reference and fused modules (sharing Parameters) both on one NF4 copy of ref's base weight."""
    from snuggle.quant.nf4 import NF4Weight

    nf4 = NF4Weight.from_dense(ref.weight.detach(), dtype=dtype)
    for m in (ref, fast):
        del m._parameters["weight"]
        m.weight = nf4


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
