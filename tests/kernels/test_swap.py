"""kernels/swap.py: the fast path swapped into a whole model keeps its parameters and matches the reference
model's loss and gradients, under activation checkpointing too, and trains the same curve.

See harness.py for how the kernels run without a GPU (Triton's interpreter)."""

from __future__ import annotations

import copy

import pytest
import torch
from harness import (  # noqa: F401 (_kernel_env: a fixture)
    BF16,
    CUDA,
    DEV,
    F32,
    HAS_TRITON,
    _kernel_env,
    assert_close,
    dtype_id,
    fn_name,
    graph_names,
    needs_triton,
    tiny_decoder,
)

from snuggle.model.checkpointing import configure_checkpointing
from snuggle.model.decoder import Decoder
from snuggle.model.loss import IGNORE_INDEX

if HAS_TRITON:
    from snuggle.kernels import apply_fast_path
    from snuggle.kernels.lora import FastLoRALinear
    from snuggle.kernels.rmsnorm import FastRMSNorm

pytestmark = pytest.mark.usefixtures("single_thread", "_kernel_env")


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
