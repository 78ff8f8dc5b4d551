"""FP8 frozen base (`model.quantize: fp8`): the format, its GEMMs against their reference, LoRA on top,
a CPU training run against the 16-bit base, the export, the memory plan's bytes.

On the CPU the FP8 weight multiplies through the reference path (`fp8_mm_reference`, fp32); the CUDA
scaled GEMM is held to that reference on odd shapes where a GPU of compute capability 8.9+ is present.
"""

from __future__ import annotations

import pytest
import torch
from tests.test_train import learnable_docs, make_cfg, read_metrics, write_jsonl

from snuggle.errors import SnuggleError
from snuggle.kernels.lora import LoRAGroupFunction, lora_linear
from snuggle.load import QUANTIZABLE, load
from snuggle.lora import LoRALinear, count_parameters
from snuggle.quant.fp8 import (
    F8_MAX,
    FP8Weight,
    check_fp8_device,
    fp8_gemm_available,
    fp8_mm_reference,
    fp8_mm_scaled,
    quantize_rows,
)
from snuggle.quant.nf4 import quantize_model
from snuggle.train.loop import train
from snuggle.train.memory import _model_terms, estimate_weight_bytes, static_bytes

pytestmark = pytest.mark.usefixtures("single_thread")

ODD = [(1, 1), (5, 70), (33, 70), (17, 129)]  # (rows, cols): none a multiple of 16
# e4m3 keeps 3 mantissa bits: rounding moves a normal value by at most 2^-4 of itself; below e4m3's
# smallest normal (2^-6 of the scale) values sit on a grid of 2^-9 scales, half of which bounds the error
REL, SUB = 2.0**-4, 2.0**-10


def _fp8_linear(out: int, inp: int, seed: int = 0) -> tuple[torch.Tensor, FP8Weight]:
    torch.manual_seed(seed)
    w = torch.randn(out, inp) * 0.05
    return w, FP8Weight.from_dense(w)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# --- the format ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ODD)
def test_round_trip_error_is_bounded(shape):
    torch.manual_seed(1)
    w = torch.randn(shape) * torch.logspace(-6, 1, shape[1])  # a wide range of magnitudes in each row
    q = FP8Weight.from_dense(w)
    d = q.dequantize(torch.float32)
    scale = q.scale  # (out, 1)
    assert torch.all((d - w).abs() <= REL * w.abs() + SUB * scale)
    # powers of two, at least amax / 448 and less than twice it: no overflow, at most one binade unused
    assert torch.equal(torch.frexp(scale)[0], torch.full_like(scale, 0.5))
    amax = w.abs().amax(1, keepdim=True)
    assert torch.all(amax / scale <= F8_MAX) and torch.all(amax / scale > F8_MAX / 2)
    assert q.qweight.dtype == torch.uint8 and q.nbytes() == shape[0] * shape[1] + 4 * shape[0]


def test_zero_rows_and_bf16_inputs_quantize_exactly():
    w = torch.randn(4, 40)
    w[1] = 0
    d = FP8Weight.from_dense(w).dequantize(torch.float32)
    assert torch.equal(d[1], torch.zeros(40)) and torch.isfinite(d).all()
    # a row whose amax / 448 is a power of two uses e4m3's whole range; rows near fp32's least normal
    # get a finite inverse scale
    edge = torch.tensor([[3.0, -448.0 * 4], [1e-38, 2e-38], [1e-40, 0.0]])
    q, s = quantize_rows(edge)
    assert q.float()[0, 1] == -F8_MAX and s[0] == 4 and torch.isfinite(q.float()).all()
    # power-of-two scales make the scaling exact in bf16: quantizing a bf16 tensor in bf16 gives the
    # codes the fp32 computation of the same values gives
    x = torch.randn(9, 50).to(torch.bfloat16) * 3
    q16, s16 = quantize_rows(x)
    q32, s32 = quantize_rows(x.float())
    assert torch.equal(q16.view(torch.uint8), q32.view(torch.uint8)) and torch.equal(s16, s32)


def test_dequantize_returns_its_dtype():
    w = torch.randn(8, 16).to(torch.bfloat16)
    q = FP8Weight.from_dense(w)
    assert q.dtype == torch.bfloat16 and q.dequantize().dtype == torch.bfloat16
    assert q.shape == (8, 16) and q.device == w.device


# --- the GEMMs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "out", "inp"), [(1, 1, 1), (5, 33, 70), (13, 17, 129), (7, 48, 32)])
def test_linear_forward_and_input_gradient_are_the_quantized_function(n, out, inp):
    """y and dx equal the products of the quantized operands, and stay near the dense products."""
    w, q = _fp8_linear(out, inp)
    bias = torch.randn(out, requires_grad=True)
    x = torch.randn(2, n, inp, requires_grad=True)
    y = q.linear(x, bias)  # (2, n, out)
    g = torch.randn_like(y)
    y.backward(g)
    x2, g2 = x.detach().reshape(-1, inp), g.reshape(-1, out)
    # the oracle, by hand: x per token, W per channel; g with W's scales folded in, per token
    x8, sx = quantize_rows(x2)
    y_ref = (x8.float() * sx) @ (q.w8.float() * q.scale).t() + bias.detach()
    g8, sg = quantize_rows(g2 * q.scale.t())
    dx_ref = (g8.float() * sg) @ q.w8.float()
    torch.testing.assert_close(y.detach().reshape(-1, out), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.reshape(-1, inp), dx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bias.grad, g2.sum(0))
    # against the dense weight: e4m3's ~2^-5 RMS rounding of two operands (measured 3-4% here)
    if n * inp > 1:
        assert _rel(y.detach().reshape(-1, out), x2 @ w.t() + bias.detach()) < 0.08
        assert _rel(x.grad.reshape(-1, inp), g2 @ w) < 0.08


def test_reference_matches_dense_within_e4m3_rounding_at_model_shapes():
    """The measured tolerance of the reference against fp32 at a projection's shape (256 x 512)."""
    w, q = _fp8_linear(256, 512, seed=3)
    x = torch.randn(64, 512)
    assert _rel(q.mm(x), x @ w.t()) < 0.05  # measured 0.036
    g = torch.randn(64, 256)
    assert _rel(q.mm_t(g), g @ w) < 0.05


def _scaled_mm_runs(device: str) -> bool:
    """Whether `device` runs torch._scaled_mm with rowwise scales: an FP8 GPU, or a torch build whose CPU
    kernel has them."""
    if device == "cuda":
        return torch.cuda.is_available() and fp8_gemm_available(torch.device("cuda"))
    a8, sa = quantize_rows(torch.ones(16, 16))
    try:
        fp8_mm_scaled(a8, sa, a8, sa, torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize(("n", "m", "k"), [(1, 16, 16), (5, 33, 70), (13, 17, 129), (64, 256, 512)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scaled_mm_matches_the_reference_on_odd_shapes(device, n, m, k, dtype):
    """The scaled GEMM call (layout, rowwise scales, padding to 16) against the fp32 reference: on an
    FP8 GPU, and on the CPU where torch has the kernel (which checks the call's conventions)."""
    if not _scaled_mm_runs(device):
        pytest.skip(f"no rowwise-scaled FP8 GEMM on {device}")
    torch.manual_seed(0)
    a8, sa = quantize_rows(torch.randn(n, k, device=device).to(dtype))
    b8, sb = quantize_rows(torch.randn(m, k, device=device) * 0.05)
    got = fp8_mm_scaled(a8, sa, b8, sb, dtype)
    ref = fp8_mm_reference(a8, sa, b8, sb, torch.float32)
    # same products, fp32 accumulation in another order; the GEMM writes bf16 (2^-9) for either dtype
    assert got.dtype == dtype and got.shape == (n, m)
    torch.testing.assert_close(got.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2)


@pytest.mark.skipif(not _scaled_mm_runs("cuda"), reason="needs a CUDA GPU with FP8 GEMMs")
@pytest.mark.parametrize(("n", "out", "inp"), [(5, 33, 70), (64, 256, 512)])
def test_cuda_linear_matches_the_cpu_reference(n, out, inp):
    """The whole FP8Weight path on the GPU (bf16 activations) against the same weight on the CPU."""
    w, q = _fp8_linear(out, inp)
    x = torch.randn(n, inp).to(torch.bfloat16)
    g = torch.randn(n, out).to(torch.bfloat16)
    xc = x.cuda().requires_grad_()
    y = FP8Weight.from_dense(w.cuda(), dtype=torch.bfloat16).linear(xc, None)
    y.backward(g.cuda())
    assert y.dtype == torch.bfloat16 and xc.grad.dtype == torch.bfloat16
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y.float().cpu(), q.mm(x.float()), **tol)
    torch.testing.assert_close(xc.grad.float().cpu(), q.mm_t(g.float()), **tol)


def test_cpu_passes_the_device_check_and_old_gpus_get_one_line(monkeypatch):
    check_fp8_device(torch.device("cpu"))
    import snuggle.quant.fp8 as fp8

    monkeypatch.setattr(fp8, "_capability", lambda index: (8, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(SnuggleError, match="compute capability 8.9.*this one is 8.0"):
        check_fp8_device(torch.device("cuda", 0))


# --- LoRA on an FP8 base ---------------------------------------------------------------------------


def _lora_pair(out: int, inp: int, r: int = 4) -> tuple[LoRALinear, LoRALinear]:
    """(LoRA on the dense weight, LoRA on its FP8 form) with the same factors, B nonzero."""
    w, q = _fp8_linear(out, inp)
    base = torch.nn.Linear(inp, out, bias=False)
    with torch.no_grad():
        base.weight.copy_(w)
    dense = LoRALinear(base, r, 8)
    quant = LoRALinear(torch.nn.Linear(inp, out, bias=False), r, 8)
    del quant._parameters["weight"]
    quant.weight = q
    with torch.no_grad():
        quant.lora_A.copy_(dense.lora_A)
        dense.lora_B.normal_()
        quant.lora_B.copy_(dense.lora_B)
    return dense, quant


def test_lora_factor_gradients_flow_through_an_fp8_base():
    """With a loss linear in the output, dA and dB do not depend on the base: they equal the dense
    base's exactly, while dx carries the FP8 rounding."""
    dense, quant = _lora_pair(33, 70)
    x = torch.randn(5, 70, requires_grad=True)
    c = torch.randn(5, 33)
    grads = []
    for m in (dense, quant):
        x.grad = None
        (m(x) * c).sum().backward()
        grads.append((m.lora_A.grad, m.lora_B.grad, x.grad))
    (dA, dB, dx), (qA, qB, qx) = grads
    assert qA.abs().sum() > 0 and qB.abs().sum() > 0
    torch.testing.assert_close(qA, dA)
    torch.testing.assert_close(qB, dB)
    assert 0 < _rel(qx, dx) < 0.08
    assert not quant.weight.qweight.requires_grad and quant.weight.qweight.grad is None


def test_fused_functions_match_the_reference_module_on_an_fp8_base():
    """The fast path's autograd Functions (the FP8 GEMM first, the low-rank term added onto it) give
    the reference LoRALinear's output and gradients on the same FP8 weights."""
    _, q1 = _lora_pair(33, 70)
    _, q2 = _lora_pair(17, 70)
    x = torch.randn(2, 5, 70, requires_grad=True)
    cs = [torch.randn(2, 5, 33), torch.randn(2, 5, 17)]

    def grads(fn):
        for m in (q1, q2):
            m.zero_grad()
        x.grad = None
        ys = fn()
        sum((y * c).sum() for y, c in zip(ys, cs, strict=True)).backward()
        return (
            [y.detach() for y in ys],
            x.grad.clone(),
            [p.grad.clone() for m in (q1, q2) for p in (m.lora_A, m.lora_B)],
        )

    ref = grads(lambda: (q1(x), q2(x)))
    one = grads(lambda: tuple(lora_linear(x, m.weight, None, m.lora_A, m.lora_B, m.scale) for m in (q1, q2)))
    flat = [t for m in (q1, q2) for t in (m.weight, None, m.lora_A, m.lora_B)]
    group = grads(lambda: LoRAGroupFunction.apply(x, (q1.scale, q2.scale), None, 0.0, *flat))
    for got in (one, group):
        for a, b in zip(got[0], ref[0], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
        for a, b in zip(got[2], ref[2], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --- loading, counting, memory ---------------------------------------------------------------------


def test_load_quantizes_every_block_projection_and_counts_its_bytes(tiny_hf_model, tmp_path):
    path, _ = tiny_hf_model("llama", False, tmp_path)
    dense, _ = load(path, with_tokenizer=False, device="cpu", dtype="float32")
    q, _ = load(path, with_tokenizer=False, quantize="fp8", device="cpu", dtype="float32")
    mods = {n: m for n, m in q.named_modules() if isinstance(m, FP8Weight)}
    assert sorted(f"{n}" for n in mods) == sorted(
        n for n, _ in dense.named_parameters() if QUANTIZABLE.fullmatch(n)
    )
    for name, m in mods.items():
        w = dense.get_parameter(name)
        assert m.dtype == torch.float32
        torch.testing.assert_close(m.dequantize(), FP8Weight.from_dense(w).dequantize())
    assert count_parameters(q) == count_parameters(dense)
    # the memory plan's estimate before the model is built is the built model's bytes
    assert static_bytes(q) == estimate_weight_bytes(q.args, 4, "fp8")
    assert static_bytes(dense) == estimate_weight_bytes(dense.args, 4, "none")
    # the plan's short-lived bytes: backward's transposed copy of the largest weight, and per token the
    # scaled copy (fp32: this model's dtype) and e4m3 bytes of the widest GEMM input
    terms = _model_terms(q)
    f, h = q.args.intermediate_size, q.args.hidden_size
    assert terms["transient"] == f * h and terms["transient_per_token"] == (4 + 1) * f


def test_gguf_base_loads_in_fp8_and_predicts_as_the_dense_one(smollm):
    """The real SmolLM2-135M GGUF, quantized to FP8 as it is read: every projection in FP8 and the
    next-token distributions near the dense model's (measured: KL 0.029 nats a token, 18 of 19 top-1
    predictions the same; NF4 on the same text: KL 0.36, 14 of 19)."""
    dense, tok = load(smollm, device="cpu", dtype="float32")
    text = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        want = dense(ids).log_softmax(-1)
    del dense
    q, _ = load(smollm, with_tokenizer=False, device="cpu", dtype="float32", quantize="fp8")
    assert sum(isinstance(m, FP8Weight) for m in q.modules()) == 7 * q.args.num_layers
    with torch.no_grad():
        got = q(ids).log_softmax(-1)
    kl = torch.nn.functional.kl_div(got, want, log_target=True, reduction="none").sum(-1).mean()
    assert kl < 0.1, kl
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85


def test_quantize_model_from_bf16_weights(tiny_hf_model, tmp_path):
    path, _ = tiny_hf_model("llama", False, tmp_path)
    model, _ = load(path, with_tokenizer=False, device="cpu", dtype="bfloat16")
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert quantize_model(model, cls=FP8Weight) == 7 * model.args.num_layers
    for name, m in model.named_modules():
        if isinstance(m, FP8Weight):
            assert m.dtype == torch.bfloat16
            w = ref[name].float()
            assert torch.all((m.dequantize(torch.float32) - w).abs() <= REL * w.abs() + SUB * m.scale)


def test_fp8_needs_lora(tiny_hf_model, tmp_path):
    path, _ = tiny_hf_model("llama", False, tmp_path)
    corpus = write_jsonl(tmp_path / "c.jsonl", learnable_docs(10))
    assert make_cfg(path, corpus, tmp_path / "o", "model.quantize=fp8").model.quantize == "fp8"
    with pytest.raises(SnuggleError, match="fp8 freezes the base in 8 bits: it needs LoRA"):
        make_cfg(path, corpus, tmp_path / "o", "model.quantize=fp8", "lora=null")


# --- training and export ---------------------------------------------------------------------------


def test_lora_on_fp8_base_tracks_the_16bit_base_and_exports_merged(tiny_hf_model, tmp_path):
    """10 CPU steps on an FP8 base follow the 16-bit-base curve (measured: at most 2.0% apart over two
    seeds; held to 5%); with trained embeddings too. The export writes the merged 16-bit model: the
    run's dequantized weights plus its LoRA update, which transformers loads."""
    path, _ = tiny_hf_model("llama", False, tmp_path, hidden_size=64, intermediate_size=128)
    corpus = write_jsonl(tmp_path / "c.jsonl", learnable_docs(80))
    common = ("train.steps=10", "train.lr=0.02", "train.batch_size=4", "model.device=cpu")
    curves = {}
    for q in ("none", "fp8"):
        out = tmp_path / f"run-{q}"
        train(make_cfg(path, corpus, out, f"model.quantize={q}", *common))
        curves[q] = torch.tensor([r["loss"] for r in read_metrics(out) if "loss" in r])
    base, fp8 = curves["none"], curves["fp8"]
    assert base[-1] < 0.7 * base[0]  # it learns
    assert ((fp8 - base).abs() / base).max() < 0.05, (fp8.tolist(), base.tolist())

    out = tmp_path / "run-fp8-emb"
    train(make_cfg(path, corpus, out, "model.quantize=fp8", "lora.train_embeddings=true", *common))
    emb = torch.tensor([r["loss"] for r in read_metrics(out) if "loss" in r])
    assert emb[-1] < 0.7 * emb[0]

    from transformers import AutoModelForCausalLM

    from snuggle.cli import main
    from snuggle.lora import LoRALinear
    from snuggle.rebuild import load_run

    assert main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "merged")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    model, _, _ = load_run(out)
    hf_state = hf.state_dict()
    loras = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert loras and all(isinstance(m.weight, FP8Weight) for m in loras.values())
    for name, m in loras.items():
        want = m.weight.dequantize(torch.float32) + m.delta_weight()
        torch.testing.assert_close(hf_state[f"{name}.weight"], want.to(m.weight.dtype).float())
    torch.testing.assert_close(hf_state["model.embed_tokens.weight"], model.model.embed_tokens.weight.float())
    ids = torch.randint(0, model.args.vocab_size, (2, 13))
    with torch.no_grad():
        # the FP8 model also rounds its activations; the merged 16-bit model does not
        assert _rel(hf(input_ids=ids).logits, model(ids)) < 0.05
