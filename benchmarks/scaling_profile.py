"""One GPU's profile of a scaling.py config: the `--profile` JSON that replaces an estimate by a measurement.

Builds the config's model as the trainer does (random-init weights of its shape in bf16, NF4 base where
the config is QLoRA, LoRA and trained embeddings, the Triton fast path, the memory plan for the whole
card, the config's optimizer), then times `--steps` optimizer steps of `grad_accum` micro-batches after
`--warmup`: each micro-batch's forward+backward and its backward alone, and the optimizer step. Medians.

usage: python benchmarks/scaling_profile.py --config cpt --out cpt-profile.json
       python benchmarks/scaling.py --config cpt --profile cpt-profile.json
       python benchmarks/scaling_profile.py --config cpt --shape tiny --device cpu --out p.json  # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import scaling  # noqa: E402
from bench import SHAPES, init_weights  # noqa: E402

from snuggle.config import LoraConfig, TrainConfig  # noqa: E402
from snuggle.lora import apply_lora  # noqa: E402
from snuggle.model.args import ModelArgs  # noqa: E402
from snuggle.model.decoder import Decoder  # noqa: E402


def build(cfg: scaling.Config, shape: dict, device: torch.device) -> torch.nn.Module:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = Decoder(ModelArgs.from_hf(shape)).to(dtype)  # never allocate fp32 weights on the way
    model.to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        init_weights(model.named_parameters())
    model.compute_dtype = dtype
    if cfg.quantize == "nf4":
        from snuggle.quant.nf4 import quantize_model

        quantize_model(model)
    apply_lora(
        model,
        LoraConfig(
            r=cfg.lora_r, alpha=cfg.lora_alpha, rslora=cfg.rslora, train_embeddings=cfg.train_embeddings
        ),
    )
    if device.type == "cuda":
        from snuggle.kernels.swap import apply_fast_path
        from snuggle.train.memory import apply_memory_plan, device_budget_gib, plan_for_model

        apply_fast_path(model)
        plan = plan_for_model(model, cfg.batch, cfg.seq, device_budget_gib(device), cfg.optimizer)
        apply_memory_plan(model, plan)
        print(plan.describe(), file=sys.stderr)
    return model.train()


class Clock:
    """Milliseconds between marks: CUDA events on a GPU (no host sync inside the step), else wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def spans(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:], strict=False)]


def profile(
    cfg: scaling.Config, model, device: torch.device, warmup: int, steps: int, note: str = ""
) -> dict:
    from snuggle.train.optim import build_optimizer

    opt = build_optimizer(model, TrainConfig(optimizer=cfg.optimizer, lr=1e-5))
    vocab = model.args.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)
    micro, backward, optimizer = [], [], []
    for step in range(warmup + steps):
        clock = Clock(device)
        for _ in range(cfg.grad_accum):
            ids = torch.randint(0, vocab, (cfg.batch, cfg.seq + 1), device=device, generator=gen)
            clock.mark()
            loss = model(ids[:, :-1], labels=ids[:, 1:]) / (cfg.batch * cfg.seq * cfg.grad_accum)
            clock.mark()
            loss.backward()
            clock.mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.mark()
        spans = clock.spans()  # per micro-batch: forward, backward, (gap to the next forward); optimizer
        if step < warmup:
            continue
        for i in range(cfg.grad_accum):
            micro.append(spans[3 * i] + spans[3 * i + 1])
            backward.append(spans[3 * i + 1])
        optimizer.append(spans[-1])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "micro_batch_ms": statistics.median(micro),
        "backward_ms": statistics.median(backward),
        "optimizer_ms": statistics.median(optimizer),
        "source": f"measured on one {name}{note} (median of {steps} steps after {warmup})",
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(scaling.CONFIGS), required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), help="another model shape (tiny: a CPU smoke test)")
    ap.add_argument("--seq", type=int, help="default: the config's")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    cfg = scaling.CONFIGS[a.config]
    if a.seq:
        cfg = scaling.dataclasses.replace(cfg, seq=a.seq)
    shape = {"model_type": "llama", **SHAPES[a.shape]} if a.shape else cfg.shape
    device = torch.device(a.device)
    # a profile of another shape or length than the config's says so in its source
    note = "".join(f", {k} {v}" for k, v in (("shape", a.shape), ("seq", a.seq)) if v)
    res = profile(cfg, build(cfg, shape, device), device, a.warmup, a.steps, note)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
