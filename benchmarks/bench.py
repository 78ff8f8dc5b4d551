"""One benchmark variant in this process: LoRA training steps on a random-init Llama-3 shape.

The peers' comparison setup: bf16 weights, LoRA r=16 alpha=16 dropout 0 on q,k,v,o,gate,up,down,
fused AdamW on the trainables, input = labels = random token ids, W warm-up steps then the median of
N timed steps, peak = torch.cuda.max_memory_allocated() since the first step. Every variant builds
the same weights and LoRA factors from the parameter names (ours are HF's), so loss curves compare.

usage: python benchmarks/bench.py --variant snuggle|hf|liger|unsloth --model 1b --batch 8 --seq 2048
       [--ckpt offload|plan] [--quantize nf4|fp8] [--tile TOKENS] [--cap-gib 24]
--quantize fp8 (snuggle only): the block projections in float8 e4m3, frozen GEMMs in FP8 (sm_89+), e.g.
  python benchmarks/bench.py --variant snuggle --model 8b --batch 2 --seq 2048 --quantize fp8
prints one JSON line (also when the run fails: {"error": ...}).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
import traceback
import zlib

import torch

SHAPES = {
    # Llama-3 shapes of the peers' comparison (random init, no checkpoint needed)
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    # SmolLM2-135M: 30 narrow blocks, where per-kernel host cost weighs more than on 1B / 8B
    "135m": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    # a small shape to check the harness itself
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        vocab_size=1000,
        tie_word_embeddings=True,
    ),
}
COMMON = dict(rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_DIR = "/tmp/snuggle-bench-{model}"  # where write_model_dir saves the weights for Unsloth


def hf_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[name], **COMMON)


def _gen(name: str, seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


@torch.no_grad()
def init_weights(named_params, seed: int = 0) -> None:
    """Deterministic weights from names: matrices N(0, 0.02), norms 1. Same for HF and snuggle."""
    for name, p in named_params:
        if p.ndim >= 2:
            p.normal_(0.0, 0.02, generator=_gen(name, seed, p.device))
        else:
            p.fill_(1.0)


@torch.no_grad()
def init_rope_buffers(model) -> None:
    """A transformers model built on meta and moved with `to_empty` has uninitialized buffers: RoPE's
    inverse frequencies (not parameters, so `init_weights` skips them) are made again, in fp32, by a
    fresh rotary module of the same config, as `from_pretrained` would have them."""
    for mod in model.modules():
        if isinstance(getattr(mod, "inv_freq", None), torch.Tensor) and hasattr(mod, "config"):
            fresh = type(mod)(mod.config)
            for name in ("inv_freq", "original_inv_freq"):
                if isinstance(getattr(mod, name, None), torch.Tensor):
                    setattr(mod, name, getattr(fresh, name).to(mod.inv_freq.device, torch.float32))


@torch.no_grad()
def init_lora(module_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """LoRA A uniform(+-1/sqrt(in)) seeded by the projection's name, B zero, as PEFT starts."""
    bound = 1.0 / math.sqrt(a.shape[1])
    a.uniform_(-bound, bound, generator=_gen(module_name, 1, a.device))
    b.zero_()


def batches(steps: int, batch: int, seq: int, vocab: int, device):
    g = torch.Generator(device=device).manual_seed(1234)
    return [torch.randint(0, vocab, (batch, seq), generator=g, device=device) for _ in range(steps)]


def build_snuggle(args, device):
    from snuggle.config import LoraConfig
    from snuggle.lora import LoRALinear, apply_lora
    from snuggle.model.args import ModelArgs
    from snuggle.model.checkpointing import configure_checkpointing
    from snuggle.model.decoder import Decoder

    cfg = hf_config(args.model).to_dict()
    cfg["model_type"] = "llama"
    margs = ModelArgs.from_hf(cfg)
    with torch.device("meta"):
        model = Decoder(margs).to(torch.bfloat16)  # cast while on meta: never allocate fp32 weights
    model.to_empty(device=device)
    model.tie_weights()
    init_weights(model.named_parameters())
    model.compute_dtype = torch.bfloat16
    if args.quantize in ("nf4", "fp8"):
        from snuggle.quant.fp8 import FP8Weight, check_fp8_device
        from snuggle.quant.nf4 import NF4Weight, quantize_model

        if args.quantize == "fp8":
            check_fp8_device(device)
        # the same bf16 weights, then each block projection in NF4 (QLoRA) or FP8
        quantize_model(model, cls=NF4Weight if args.quantize == "nf4" else FP8Weight)
        torch.cuda.empty_cache()
    if args.no_lora:
        no_lora_bound(model)
    else:
        apply_lora(model, LoraConfig(r=16, alpha=16, targets=TARGETS))
        for name, mod in model.named_modules():
            if isinstance(mod, LoRALinear):
                init_lora(name, mod.lora_A, mod.lora_B)
    swapped = []
    if not args.no_kernels:
        try:
            from snuggle.kernels.swap import apply_fast_path

            swapped = apply_fast_path(model)
        except ImportError:
            swapped = []
    info = {"kernels": len(swapped)}
    if args.ckpt == "plan":
        # what the trainer does by default: the memory plan for the cap (or the whole card)
        from snuggle.train.memory import apply_memory_plan, device_budget_gib, plan_for_model

        budget = args.cap_gib or device_budget_gib(device)
        plan = plan_for_model(model, args.batch, args.seq, budget, offload_blocks_max=args.offload_blocks)
        apply_memory_plan(model, plan)
        info.update(plan=plan.describe(), predicted_gib=plan.predicted_gib)
    else:
        n = {"none": 0, "all": None, "offload": None}.get(args.ckpt)
        if args.ckpt.startswith("layers:"):
            n = int(args.ckpt.split(":")[1])
        configure_checkpointing(
            model, n, offload=args.ckpt == "offload" or args.offload, offload_blocks=args.offload_blocks or 0
        )
        for i, block in enumerate(model.model.layers):
            block.mlp.tile_tokens = args.tile
            block.mlp.recompute_product = args.recompute_product
            block.recompute_norm = args.recompute_norm
            # a recomputed block makes all of its insides again anyway
            block.mlp.recompute_gate_up = args.recompute_gate_up and i not in model.checkpoint_layers
        from snuggle.train.memory import predict_for_model

        # what a plan with these settings would predict, beside the measured peak (gate/up: not modelled)
        info["predicted_gib"] = predict_for_model(model, args.batch * args.seq) / 2**30
    model.train()

    def step_loss(ids):
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        return model.loss_sum(ids, labels) / labels[:, :-1].numel()

    return model, step_loss, info


def no_lora_bound(model) -> None:
    """The step a LoRA step could at best become: no adapters, every weight frozen but the first block's
    input norm (an fp32 copy), so backward still runs the input gradients through every block, as LoRA's
    does, with the same frozen GEMMs, attention, norms, SwiGLU and fused loss; only the rank-sized
    products and their fused launches are missing. (q/k/v and gate/up are then separate Linears whose
    input gradients autograd sums, a little slower than the grouped LoRA Functions.)"""
    from torch import nn

    model.requires_grad_(False)
    norm = model.model.layers[0].input_layernorm
    norm.weight = nn.Parameter(norm.weight.detach().float(), requires_grad=True)


def init_peft_lora(model) -> None:
    """A PEFT-wrapped model's LoRA factors (HF + PEFT, Liger, Unsloth) set as `init_lora` sets ours."""
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            init_lora(
                name.removeprefix("base_model.model."),
                mod.lora_A["default"].weight,
                mod.lora_B["default"].weight,
            )


def hf_step_loss(model):
    """The mean next-token loss of a transformers causal LM (labels = inputs, shifted inside)."""

    def step_loss(ids):
        return model(input_ids=ids, labels=ids).loss

    return step_loss


def hf_model(cfg, device):
    """A transformers Llama of `cfg` in bf16 with the harness's seeded weights: built on meta, moved
    with `to_empty`, then every parameter and RoPE buffer set (`init_weights`, `init_rope_buffers`)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.to_empty(device=device)
    model.tie_weights()
    init_weights(model.named_parameters())
    init_rope_buffers(model)
    return model


def build_hf(args, device, liger: bool = False):
    from peft import LoraConfig, get_peft_model

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    model = hf_model(hf_config(args.model), device)
    if args.ckpt != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    init_peft_lora(model)
    model.train()
    return model, hf_step_loss(model), {}


def write_model_dir(args, device) -> str:
    """The random-init weights of `build_hf`, saved as an HF directory with a tokenizer, for a peer that
    only loads from a path (Unsloth): MODEL_DIR, reused when already written."""
    from pathlib import Path

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    path = Path(MODEL_DIR.format(model=args.model))
    if (path / "config.json").exists():
        return str(path)
    cfg = hf_config(args.model)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 3
    model = hf_model(cfg, device)
    tmp = path.with_name(path.name + ".part")
    model.save_pretrained(tmp)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # a word-level vocabulary of the model's size: the inputs are token ids, the tokenizer is never run
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")),
        unk_token="t0",
        bos_token="t1",
        eos_token="t2",
        pad_token="t3",
        model_max_length=cfg.max_position_embeddings,
    )
    tok.save_pretrained(tmp)
    tmp.rename(path)
    return str(path)


def build_unsloth(args, device):
    """Unsloth's FastLanguageModel on the weights of `build_hf` (loaded from a directory it writes),
    LoRA as the others; checkpointing: Unsloth's own offloaded mode ("unsloth") or none."""
    import unsloth  # noqa: F401  (first: it patches transformers and peft when imported)
    from unsloth import FastLanguageModel

    path = write_model_dir(args, device)
    model, _ = FastLanguageModel.from_pretrained(
        model_name=path,
        max_seq_length=args.seq,
        dtype=torch.bfloat16,
        load_in_4bit=args.quantize == "nf4",  # bitsandbytes NF4 with double quantization
        fix_tokenizer=False,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        target_modules=TARGETS,
        use_gradient_checkpointing="unsloth" if args.ckpt != "none" else False,
        max_seq_length=args.seq,
    )
    init_peft_lora(model)
    # model.train(), not FastLanguageModel.for_training: that one sets gradient checkpointing on everywhere
    model.train()

    return model, hf_step_loss(model), {}


# aten ops that run one GEMM (or a batch of them): their kernels' time is put on what they multiply
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}
RANK_MAX = 64  # a GEMM with a dimension this small is a LoRA rank-sized product (r = 16, 48 for q/k/v)


def step_category(name: str, shapes, vocab: int) -> str:
    """Where an op's kernel time goes in a LoRA step, from the op's name and its input shapes:
    the frozen base GEMMs, the LoRA rank-sized GEMMs (by their reduction K: the rank, or a long one),
    the lm_head GEMMs of the loss, attention, the
    custom Functions' own launches (Triton: norms, RoPE, SwiGLU, the loss rows, NF4 dequantization),
    the optimizer, and the remaining ATen ops (casts, copies, adds, reductions)."""
    if name in GEMM_OPS:
        dims = [d for s in shapes if len(s) >= 2 for d in s[-2:]]  # the matrices' sizes
        if vocab in dims:
            return "GEMM lm_head (loss)"
        if dims and min(dims) <= RANK_MAX:
            # K: the first factor's columns (addmm's first input is what it adds onto)
            k = shapes[1][-1] if name in ("aten::addmm", "aten::addmm_", "aten::baddbmm") else shapes[0][-1]
            # the others reduce over features (x A^T, g B) or tokens (dA, dB): one shape when they agree
            if k <= RANK_MAX:
                return "GEMM LoRA K = r (xa B^T, gB A)"
            return "GEMM LoRA K long (x A^T, g B, dA, dB)"
        return "GEMM frozen base"
    low = name.lower()
    if any(k in low for k in ("attention", "flash", "flex", "sdpa")):
        return "attention"
    if "adam" in low:
        return "optimizer"
    if not name.startswith("aten::") and "Function" in name:
        return "Triton kernels in Functions"
    if name.startswith("aten::"):
        return "other ATen (casts, copies, adds)"
    return "other"


def step_breakdown(events, vocab: int) -> dict[str, float]:
    """Kernel ms a step spends per `step_category`, from profiler events averaged by input shape. Only
    CPU-side ops are summed: each kernel's time is counted once, on the op that launched it."""
    out: dict[str, float] = {}
    for e in events:
        t = getattr(e, "self_device_time_total", 0)
        if t <= 0 or str(getattr(e, "device_type", "")).endswith("CUDA"):
            continue
        cat = step_category(e.key, e.input_shapes or [], vocab)
        out[cat] = out.get(cat, 0.0) + t / 1e3
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


GAP_BUCKETS_US = (5, 20, 100)  # idle time between kernels, by the length of the gap


def kernel_gaps(kernels) -> dict:
    """Where the GPU ran no kernel in a step, from (name, start us, end us) of every kernel (any stream):
    the kernels' count, the union of their intervals (busy), the step's span, the idle time between
    them by gap length (many short gaps: each launch's own latency; a few long ones: the GPU waited
    for something), and the longest gaps with the kernels around them."""
    ks = sorted(kernels, key=lambda k: k[1])
    buckets = {f"<{GAP_BUCKETS_US[0]}us": 0.0}
    buckets.update({f"{a}-{b}us": 0.0 for a, b in itertools.pairwise(GAP_BUCKETS_US)})
    buckets[f">={GAP_BUCKETS_US[-1]}us"] = 0.0
    longest, busy, end, prev = [], 0.0, None, None
    for name, t0, t1 in ks:
        if end is not None and t0 > end:
            gap = t0 - end
            i = sum(gap >= b for b in GAP_BUCKETS_US)
            buckets[list(buckets)[i]] += gap / 1e3
            longest.append((round(gap, 1), prev[:60], name[:60]))
        if end is None or t0 >= end:
            busy += t1 - t0
        elif t1 > end:
            busy += t1 - end
        if end is None or t1 >= end:
            end, prev = t1, name
    span = (end - ks[0][1]) / 1e3 if ks else 0.0
    return {
        "kernels": len(ks),
        "busy_ms": round(busy / 1e3, 3),
        "span_ms": round(span, 3),
        "idle_ms": {k: round(v, 3) for k, v in buckets.items()},
        "longest_gaps_us": sorted(longest, reverse=True)[:8],
    }


def profile_gaps(step) -> dict:
    """`kernel_gaps` of one call of `step` (a whole training step), traced with the CUDA activity only,
    so the profiler adds little host time of its own."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [
        (e.name, e.time_range.start, e.time_range.end)
        for e in prof.events()
        if str(e.device_type).endswith("CUDA")
    ]
    return kernel_gaps(kernels)


def profile_step(step_loss, opt, ids, vocab: int) -> dict[str, float]:
    """Profile one more step: print its CUDA kernels by total time (stderr), to see where a step goes,
    and return the kernel ms per category (`step_breakdown`)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
        step_loss(ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60), file=sys.stderr)
    parts = step_breakdown(prof.key_averages(group_by_input_shape=True), vocab)
    total = sum(parts.values())
    for cat, ms in parts.items():
        print(f"{cat:40s} {ms:8.2f} ms  {100 * ms / total:5.1f}%", file=sys.stderr)
    return {k: round(v, 2) for k, v in parts.items()}


def run(args) -> dict:
    if args.variant == "snuggle":  # the trainer's allocator setting, before CUDA starts
        from snuggle.train.memory import prefer_expandable_segments

        prefer_expandable_segments()
    if args.variant == "unsloth":
        # Unsloth reads its switches and sets its allocator (expandable_segments) when it is imported:
        # before CUDA starts, or its rows run on the default allocator
        if args.gc_keep_layers:
            os.environ["UNSLOTH_GC_KEEP_LAYERS"] = args.gc_keep_layers
        import unsloth  # noqa: F401
    device = torch.device("cuda", torch.cuda.current_device())
    if args.cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total), device)
    torch.manual_seed(0)
    if args.quantize == "fp8" and args.variant != "snuggle":  # a row saying so, not a silent bf16 run
        raise ValueError("--quantize fp8 is measured for the snuggle variant only")
    if args.no_loss_sync or args.graph:  # a captured step cannot hold the loss's host sync
        import snuggle.kernels.linear_ce as linear_ce

        linear_ce.DROP_MASKED_ROWS = False
    if args.variant == "snuggle":
        model, step_loss, info = build_snuggle(args, device)
    elif args.variant in ("hf", "liger"):
        model, step_loss, info = build_hf(args, device, liger=args.variant == "liger")
    elif args.variant == "unsloth":
        model, step_loss, info = build_unsloth(args, device)
    else:
        raise SystemExit(f"unknown variant {args.variant}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, fused=True, capturable=args.graph)
    data = batches(args.warmup + args.steps, args.batch, args.seq, SHAPES[args.model]["vocab_size"], device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    times, losses, host = [], [], []
    graph_step = captured_step(step_loss, opt, data[0]) if args.graph else None
    for i, ids in enumerate(data):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        if graph_step is not None:
            loss = graph_step(ids)
        else:
            loss = step_loss(ids)
            t1 = time.perf_counter()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        end.record()
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        if graph_step is None and i >= args.warmup:
            # host ms in forward (up to the loss), in backward + step, and the GPU's queue left after it
            host.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(start.elapsed_time(end) / 1e3)
    if args.profile:
        if graph_step is None:
            info["profile_ms"] = profile_step(step_loss, opt, data[-1], SHAPES[args.model]["vocab_size"])

        def one_step():
            if graph_step is not None:
                return graph_step(data[-1])
            step_loss(data[-1]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        info["gaps"] = profile_gaps(one_step)
        print(json.dumps(info["gaps"]), file=sys.stderr)
    step = statistics.median(times)
    tokens = args.batch * args.seq
    return {
        **info,
        "tokens_per_s": tokens / step,
        "step_s": step,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        # what the caching allocator held: live tensors, its rounding and fragmentation (the cap binds it)
        "reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
        "trainable": sum(p.numel() for p in params),
        "host_ms": [round(statistics.median(h) * 1e3, 1) for h in zip(*host, strict=True)] if host else None,
    }


def captured_step(step_loss, opt, ids0):
    """The whole step (forward, backward, optimizer) captured once as a CUDA graph: replaying it costs
    no host time per kernel, so its speed is the GPU's alone. Returns step(ids) -> loss. The step may
    hold no host sync: `run` has turned the fused loss's off (`linear_ce.DROP_MASKED_ROWS`)."""
    static = ids0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(2):
            step_loss(static).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # grads are None here: backward allocates them in the graph's pool
        loss = step_loss(static)
        loss.backward()
        opt.step()

    def step(ids):
        static.copy_(ids)
        graph.replay()
        return loss

    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", required=True, choices=["snuggle", "hf", "liger", "unsloth"])
    p.add_argument("--model", default="1b", choices=list(SHAPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--ckpt", default="none", help="none | all | offload | layers:N")
    p.add_argument("--offload", action="store_true", help="with layers:N, offload the checkpointed inputs")
    p.add_argument(
        "--offload-blocks",
        type=int,
        default=None,
        help="blocks whose saved activations wait in CPU memory (with --ckpt plan: the most the plan may "
        "take; default: what the host link carries, measured)",
    )
    p.add_argument("--cap-gib", type=float, default=0.0, help="emulate a smaller card")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument(
        "--no-lora",
        action="store_true",
        help="snuggle without adapters (backward through every block): what LoRA's products cost over",
    )
    p.add_argument(
        "--recompute-product",
        action="store_true",
        help="the MLPs make their SwiGLU product again in backward instead of keeping it (without a plan)",
    )
    p.add_argument(
        "--recompute-norm",
        action="store_true",
        help="the LoRA groups normalize their input inside and keep the norm's input, not its output",
    )
    p.add_argument(
        "--recompute-gate-up",
        action="store_true",
        help="the MLPs of blocks not recomputed keep only their input and make gate and up again in backward",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="one more step profiled: kernel time by category and the GPU's idle gaps (--graph: gaps only)",
    )
    p.add_argument("--graph", action="store_true", help="replay the whole step as one CUDA graph")
    p.add_argument("--no-loss-sync", action="store_true", help="every row through the loss's matmuls")
    p.add_argument(
        "--quantize",
        default="none",
        choices=["none", "nf4", "fp8"],
        help="nf4: QLoRA (snuggle, unsloth); fp8: FP8 frozen base (snuggle)",
    )
    p.add_argument("--tile", type=int, default=0, help="MLP sequence tile in tokens (0: untiled)")
    p.add_argument(
        "--gc-keep-layers",
        default="",
        help="unsloth: UNSLOTH_GC_KEEP_LAYERS (e.g. auto: layers left un-checkpointed where memory allows)",
    )
    args = p.parse_args()
    try:
        res = run(args)
    except torch.OutOfMemoryError:
        res = {"error": "out of memory"}
    except Exception as e:  # a failed variant is a row in the table, not a crash of the harness
        traceback.print_exc(file=sys.stderr)
        res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}
    res.update(
        variant=args.variant,
        model=args.model,
        batch=args.batch,
        seq=args.seq,
        ckpt=args.ckpt,
        cap_gib=args.cap_gib,
        kernels_off=args.no_kernels,
        no_lora=args.no_lora,
        graph=args.graph,
        no_loss_sync=args.no_loss_sync,
        offload=args.offload,
        quantize=args.quantize,
        tile=args.tile,
        recompute_product=args.recompute_product,
        recompute_norm=args.recompute_norm,
        recompute_gate_up=args.recompute_gate_up,
        offload_blocks=args.offload_blocks,
        gc_keep_layers=args.gc_keep_layers,
    )
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
