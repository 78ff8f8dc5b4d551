"""A scaling model: step time and scaling efficiency of DDP and FSDP2 at 2/4/8 GPUs over named links.

From a one-GPU profile of a config (compute time of a micro-batch, of its backward, of the optimizer
step) and the exact bytes each strategy sends per optimizer step, predict the step time at N GPUs and
the scaling efficiency (one GPU's step time over N GPUs' step time, the same batch per GPU).

Bytes per optimizer step, from the model's shapes (`inventory`: every parameter, its FSDP unit, its
dtype, whether it trains), as snuggle's `train.parallel` sends them (`traffic`):

- ddp: one all-reduce of every trainable gradient, in the reduce dtype, at the last micro-batch of
  the step (the others run under `no_sync`). Payload = sum of trainable numel x reduce bytes.
- fsdp (FSDP2, one unit per decoder block plus the root): per micro-batch, every block's parameters
  are all-gathered in forward and again in backward (blocks reshard after forward), the root's once
  (the root keeps them between forward and backward); every unit's trainable gradients are
  reduce-scattered (snuggle reduces every micro-batch, see `grad_sync`). Each parameter's first
  dimension is padded to a multiple of N. Floating parameters travel in the compute dtype, 4-bit
  storage (uint8/int8) as it is; gradients in the reduce dtype.

Payload is the collective's tensor: the all-reduce buffer, the all-gather output, the reduce-scatter
input. A ring moves 2(N-1)/N of the payload per rank for an all-reduce and (N-1)/N for an all-gather
or a reduce-scatter; time = that / the link's bus bandwidth (nccl-tests' "busbw") + a latency per
collective. `tests/test_scaling.py` checks the payloads exactly against what a 2-process gloo run
sends through torch.distributed.

Overlap (the time model, an approximation stated as one):
- ddp: buckets are all-reduced while the last micro-batch's backward runs; what does not fit in that
  backward is exposed, and at least the gradients that are ready last are: a trained embed_tokens
  (the first module, so its gradient comes at the very end of backward) or DDP's last bucket (25 MiB).
- fsdp: a unit's all-gather is prefetched under the previous unit's compute, so a micro-batch takes
  the longer of its compute and its communication, plus the first unit's all-gather (nothing to
  hide it under) and the root's reduce-scatter (ready last). Optimizer state is sharded: 1/N of the
  optimizer step.

usage:
  python benchmarks/scaling.py                          # both named configs, every link, 1/2/4/8 GPUs
  python benchmarks/scaling.py --config cpt --profile my_profile.json   # a measured profile instead
  python benchmarks/scaling.py --link "my node=14"         # a measured busbw (GB/s) beside the named links
  python benchmarks/scaling.py --markdown docs_table.md
A profile JSON: {"micro_batch_ms": ..., "backward_ms": ..., "optimizer_ms": ...} (one GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from multi_gpu import SHAPES, flops_per_token  # noqa: E402

from snuggle.lora import resolve_targets  # noqa: E402
from snuggle.model.args import ModelArgs  # noqa: E402
from snuggle.quant.nf4 import BLOCK, GROUP  # noqa: E402

__all__ = ["Param", "Link", "Profile", "inventory", "inventory_of", "traffic", "predict", "LINKS", "CONFIGS"]

GB = 1e9
DDP_BUCKET_BYTES = 25 * 2**20  # DDP's bucket_cap_mb default: the last bucket is at most this


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    unit: str  # the FSDP unit: "root" or "layers.<i>"
    shape: tuple[int, ...]
    itemsize: int  # bytes an element as stored
    floating: bool  # floating point (cast to the compute dtype for FSDP's all-gather) or 4-bit storage
    trainable: bool
    buffer: bool = False  # a buffer, not a parameter: DDP broadcasts it from rank 0, FSDP never sends it

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Link:
    busbw_gbs: float  # all-reduce bus bandwidth, GB/s (nccl-tests' busbw at large messages)
    latency_us: float  # per collective
    source: str


# Assumptions, not measurements (no machine with several GPUs was measured for these figures).
LINKS: dict[str, Link] = {
    "PCIe 4.0 x16 via host": Link(
        10.0,
        50.0,
        "PCIe 4.0 x16 is 32 GB/s a direction on paper, ~25 GB/s for one large copy; without P2P "
        "(consumer cards) NCCL stages every transfer through host memory (SHM), about half of that",
    ),
    "PCIe 4.0 x16 P2P": Link(
        20.0,
        30.0,
        "GPU-to-GPU over PCIe (P2P through the switch or root complex): a ring runs a little "
        "below the ~25 GB/s of one copy",
    ),
    "NVLink 4": Link(
        360.0,
        15.0,
        "H100 SXM with NVSwitch: 450 GB/s a direction on paper; NCCL all-reduce busbw without NVLink "
        "multicast (NVLS) is ~360 GB/s at large messages",
    ),
}


# --- what the model holds -----------------------------------------------------------------------


def inventory(
    args: ModelArgs,
    lora_r: int | None,
    targets: str | list[str] = "all-linear",
    train_embeddings: bool = False,
    quantize: str = "none",
    weight_bytes: int = 2,
) -> list[Param]:
    """Every parameter of a snuggle Decoder built from `args`, from the shapes alone.

    As lora.py builds it: frozen weights in the model dtype (`weight_bytes`), every trainable an fp32
    copy; LoRA A (r, in), B (out, r) on the target projections; `train_embeddings`: embed_tokens and
    lm_head train as full copies (a tied pair is one tensor); `quantize="nf4"`: each block projection
    is stored as uint8 codes (out, ceil(in/2)) and int8 block scales (out, ceil(in/64)), both frozen
    parameters, and fp32 second-level scales and means (out, ceil(in/64/256)), buffers.
    `lora_r=None`: full fine-tuning.
    """
    h, f, L, V = args.hidden_size, args.intermediate_size, args.num_layers, args.vocab_size
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    full = lora_r is None
    names = () if full else resolve_targets(targets)
    out: list[Param] = []

    def add(name: str, unit: str, shape: tuple[int, ...], trainable: bool, itemsize: int | None = None):
        size = itemsize or (4 if trainable else weight_bytes)
        out.append(Param(name, unit, shape, size, itemsize is None, trainable))

    def add_buffer(name: str, unit: str, shape: tuple[int, ...]):
        out.append(Param(name, unit, shape, 4, True, False, buffer=True))

    emb_train = full or train_embeddings
    add("model.embed_tokens.weight", "root", (V, h), emb_train)
    for i in range(L):
        unit, pre = f"layers.{i}", f"model.layers.{i}."
        add(pre + "input_layernorm.weight", unit, (h,), full)
        projections = (
            ("self_attn.q_proj", q, h, args.attention_bias),
            ("self_attn.k_proj", kv, h, args.attention_bias),
            ("self_attn.v_proj", kv, h, args.attention_bias),
            ("self_attn.o_proj", h, q, args.o_proj_bias),
            ("mlp.gate_proj", f, h, args.mlp_bias),
            ("mlp.up_proj", f, h, args.mlp_bias),
            ("mlp.down_proj", h, f, args.mlp_bias),
        )
        for path, o, n, bias in projections:
            if quantize == "nf4":
                add(pre + path + ".weight.qweight", unit, (o, math.ceil(n / 2)), False, 1)
                add(pre + path + ".weight.absmax_q", unit, (o, math.ceil(n / BLOCK)), False, 1)
                groups = math.ceil(math.ceil(n / BLOCK) / GROUP)
                add_buffer(pre + path + ".weight.absmax_scale", unit, (o, groups))
                add_buffer(pre + path + ".weight.absmax_mean", unit, (o, groups))
            else:
                add(pre + path + ".weight", unit, (o, n), full)
            if bias:
                add(pre + path + ".bias", unit, (o,), full)
            if path.split(".")[-1] in names:
                add(pre + path + ".lora_A", unit, (lora_r, n), True)
                add(pre + path + ".lora_B", unit, (o, lora_r), True)
        if args.qk_norm:
            add(pre + "self_attn.q_norm.weight", unit, (args.head_dim,), full)
            add(pre + "self_attn.k_norm.weight", unit, (args.head_dim,), full)
        add(pre + "post_attention_layernorm.weight", unit, (h,), full)
    add("model.norm.weight", "root", (h,), full)
    if not args.tie_word_embeddings:
        add("lm_head.weight", "root", (V, h), emb_train)
    return out


def inventory_of(model) -> list[Param]:
    """The same list read from a built Decoder (the test holds `inventory` against it)."""
    import torch

    params = []
    tensors = [(n, p, False) for n, p in model.named_parameters()]
    for name, t, buffer in tensors + [(n, b, True) for n, b in model.named_buffers()]:
        unit = f"layers.{name.split('.')[2]}" if name.startswith("model.layers.") else "root"
        floating = torch.is_floating_point(t)
        params.append(Param(name, unit, tuple(t.shape), t.element_size(), floating, t.requires_grad, buffer))
    return params


# --- what each strategy sends -------------------------------------------------------------------


@dataclasses.dataclass
class Traffic:
    """Payload bytes of one optimizer step on one rank, by collective, and what the time model needs."""

    all_reduce: int = 0
    # ddp: the buffers from rank 0 (DDP's broadcast_buffers), once a step: DDP syncs them in the forward
    # that follows a synchronised backward, the step's first micro-batch
    broadcast: int = 0
    all_gather: int = 0
    reduce_scatter: int = 0
    collectives: int = 0  # how many, for the latency term
    tail: int = 0  # ddp: the all-reduce payload of the gradients ready last
    first_gather: int = 0  # fsdp: one micro-batch's first all-gathers (root and block 0), exposed
    last_scatter: int = 0  # fsdp: one micro-batch's last reduce-scatter (the root's), exposed

    def as_dict(self) -> dict[str, int]:
        return {
            "all_reduce": self.all_reduce,
            "broadcast": self.broadcast,
            "all_gather": self.all_gather,
            "reduce_scatter": self.reduce_scatter,
        }


def _padded(p: Param, world: int) -> int:
    # FSDP2 pads each parameter's first dimension to a multiple of the world size
    rows = p.shape[0] if p.shape else 1
    return math.ceil(rows / world) * world * (p.numel // max(rows, 1))


def traffic(
    params: list[Param],
    strategy: str,
    world: int,
    grad_accum: int,
    reduce_bytes: int = 4,
    param_bytes: int = 2,
) -> Traffic:
    """Bytes of one optimizer step of `grad_accum` micro-batches under `strategy` at `world` ranks.

    `reduce_bytes`: the gradient reduction's dtype (4: fp32, snuggle's default; 2: `train.reduce_dtype:
    bfloat16`). `param_bytes`: the compute dtype, in which FSDP all-gathers floating parameters.
    """
    t = Traffic()
    if strategy == "ddp":
        trainable = [p for p in params if p.trainable]
        t.all_reduce = sum(p.numel for p in trainable) * reduce_bytes
        t.broadcast = sum(p.numel * p.itemsize for p in params if p.buffer)
        t.collectives = max(1, math.ceil(t.all_reduce / DDP_BUCKET_BYTES)) + (1 if t.broadcast else 0)
        # buckets are cut from the gradients as they are (fp32): a bf16 reduction sends half of each
        grads = sum(p.numel * p.itemsize for p in trainable)
        last_bucket = min(grads, DDP_BUCKET_BYTES) * t.all_reduce // max(grads, 1)
        embed = [p for p in trainable if p.name == "model.embed_tokens.weight"]
        t.tail = max(last_bucket, sum(p.numel for p in embed) * reduce_bytes)
        return t
    if strategy != "fsdp":
        raise ValueError(f"strategy must be ddp or fsdp, got {strategy!r}")
    units: dict[str, list[Param]] = {}
    for p in params:
        if p.buffer:
            continue  # FSDP moves buffers to the device once; it never sends them
        units.setdefault(p.unit, []).append(p)
    gather_mb = scatter_mb = n_mb = 0
    for unit, ps in units.items():
        gathered = sum(_padded(p, world) * (param_bytes if p.floating else p.itemsize) for p in ps)
        scattered = sum(_padded(p, world) * reduce_bytes for p in ps if p.trainable)
        # blocks are gathered again for backward; the root is not resharded after forward
        times = 1 if unit == "root" else 2
        gather_mb += times * gathered
        scatter_mb += scattered
        n_mb += times + (1 if scattered else 0)
        if unit in ("root", "layers.0"):
            t.first_gather += gathered
        if unit == "root":
            t.last_scatter = scattered
    t.all_gather, t.reduce_scatter = grad_accum * gather_mb, grad_accum * scatter_mb
    t.collectives = grad_accum * n_mb
    return t


# --- the time model -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Profile:
    """One GPU, one micro-batch: what the time model starts from. `source` says measured or estimated."""

    micro_batch_ms: float  # forward + backward of one micro-batch
    backward_ms: float  # its backward: the window DDP's all-reduce hides under
    optimizer_ms: float
    source: str


def _ring_s(payload: int, factor: float, link: Link) -> float:
    return factor * payload / (link.busbw_gbs * GB)


def predict(prof: Profile, tr: Traffic, strategy: str, world: int, grad_accum: int, link: Link) -> dict:
    """Step time at `world` GPUs (ms), its communication and the part of it not hidden, and efficiency."""
    one = grad_accum * prof.micro_batch_ms + prof.optimizer_ms
    if world == 1:
        return {"step_ms": one, "comm_ms": 0.0, "exposed_ms": 0.0, "efficiency": 1.0}
    ar, ag = 2 * (world - 1) / world, (world - 1) / world
    lat_s = tr.collectives * link.latency_us * 1e-6
    if strategy == "ddp":
        # buffers are broadcast before the step's first forward, with nothing to hide under
        bcast = _ring_s(tr.broadcast, 1.0, link)
        comm = _ring_s(tr.all_reduce, ar, link) + lat_s
        exposed = max(comm - prof.backward_ms / 1e3, _ring_s(tr.tail, ar, link)) + bcast
        comm += bcast
        step = one + 1e3 * exposed
    else:
        comm = _ring_s(tr.all_gather + tr.reduce_scatter, ag, link) + lat_s
        per_mb = comm / grad_accum
        edges = _ring_s(tr.first_gather + tr.last_scatter, ag, link)
        micro = max(prof.micro_batch_ms / 1e3, per_mb) + edges
        step = 1e3 * grad_accum * micro + prof.optimizer_ms / world
        exposed = step / 1e3 - one / 1e3 + prof.optimizer_ms * (1 - 1 / world) / 1e3
    return {"step_ms": step, "comm_ms": 1e3 * comm, "exposed_ms": 1e3 * exposed, "efficiency": one / step}


# --- the two named configs ----------------------------------------------------------------------

# Mistral-7B v0.3's shape (config.json of mistralai/Mistral-7B-v0.3)
MISTRAL_7B = dict(
    model_type="mistral",
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=32768,
    tie_word_embeddings=False,
)
# multi_gpu's FLOP count reads a shape by name
SHAPES.setdefault("mistral7b", {k: v for k, v in MISTRAL_7B.items() if k != "model_type"})

# Measured: 8B LoRA r=16, batch 2 x 2048, no checkpointing, one H100 (benchmarks/results/
# targets-bound-footprints-peers-NVIDIA_H100_80GB_HBM3-faf8b8f.md): 16,497 tokens/s, 0.248 s a step.
# Fused AdamW on its 42M trainables: 0.57 ms (where-the-time-goes-H200-adb5593.md, one H200).
MEASURED_8B_STEP_MS, MEASURED_8B_TOKENS_S, MEASURED_8B_OPT_MS = 248.0, 16497.0, 0.57
BACKWARD_SHARE = 0.5  # assumed: a LoRA backward does the forward's 2N FLOPs a token again (input grads)


def _lora_flops_per_token(params: list[Param]) -> float:
    """LoRA factor FLOPs a token: forward 2r(in+out), backward twice that (input and factor gradients)."""
    return 6 * sum(p.numel for p in params if p.name.endswith(("lora_A", "lora_B")))


def _profile_8b(params: list[Param]) -> Profile:
    micro = MEASURED_8B_STEP_MS - MEASURED_8B_OPT_MS
    return Profile(
        micro,
        BACKWARD_SHARE * micro,
        MEASURED_8B_OPT_MS,
        f"measured: {MEASURED_8B_STEP_MS:.0f} ms a step on one H100 (batch 2 x 2048, no checkpointing); "
        f"backward assumed {BACKWARD_SHARE:.0%} of the micro-batch",
    )


def _profile_cpt(params: list[Param]) -> Profile:
    """Estimated, no GPU measurement of this recipe yet: its FLOPs at the model FLOP rate the 8B LoRA
    run achieved on one H100; the optimizer from the measured fused AdamW cost a trainable parameter."""
    rate = MEASURED_8B_TOKENS_S * flops_per_token("8b", 2048, full=False)  # FLOP/s
    base = flops_per_token("mistral7b", 2048, full=False)
    # trained lm_head: its weight gradient is a full (V, h) GEMM a token, 2Vh
    head = 2 * MISTRAL_7B["vocab_size"] * MISTRAL_7B["hidden_size"]
    per_token = base + _lora_flops_per_token(params) + head
    micro = 1e3 * 2 * 2048 * per_token / rate
    n_train = sum(p.numel for p in params if p.trainable)
    opt = MEASURED_8B_OPT_MS * n_train / _trainables(CONFIGS["8b-lora"])
    return Profile(
        micro,
        BACKWARD_SHARE * micro,
        opt,
        f"estimated: {per_token / 1e9:.1f} GFLOP a token at {rate / 1e12:.0f} TFLOP/s (the model FLOP rate "
        f"of the measured 8B LoRA step), QLoRA's dequantization and the r=128 products assumed to run "
        f"as fast; optimizer {opt:.1f} ms scaled from the measured 8B fused AdamW by trainable parameters "
        "(the recipe's 8-bit AdamW not measured)",
    )


@dataclasses.dataclass(frozen=True)
class Config:
    title: str
    shape: dict
    lora_r: int
    train_embeddings: bool
    quantize: str
    batch: int
    seq: int
    grad_accum: int
    profile: object  # (params) -> Profile
    lora_alpha: float = 16.0
    rslora: bool = False
    optimizer: str = "adamw"

    def params(self) -> list[Param]:
        args = ModelArgs.from_hf(self.shape)
        return inventory(args, self.lora_r, "all-linear", self.train_embeddings, self.quantize)


CONFIGS: dict[str, Config] = {
    "cpt": Config(
        "CPT recipe: Mistral-7B shape, QLoRA r=128 all-linear + trained embed_tokens and lm_head, "
        "batch 2 x 2048, accumulation 8",
        MISTRAL_7B,
        128,
        True,
        "nf4",
        2,
        2048,
        8,
        _profile_cpt,
        lora_alpha=32.0,
        rslora=True,
        optimizer="adamw8bit",
    ),
    "8b-lora": Config(
        "Llama-3 8B shape, LoRA r=16 all-linear, batch 2 x 2048, no accumulation",
        {"model_type": "llama", **SHAPES["8b"]},
        16,
        False,
        "none",
        2,
        2048,
        1,
        _profile_8b,
    ),
}


def _trainables(cfg: Config) -> int:
    return sum(p.numel for p in cfg.params() if p.trainable)


# --- the table ----------------------------------------------------------------------------------

STRATEGIES = (("ddp", 4, "fp32"), ("ddp", 2, "bf16"), ("fsdp", 4, "fp32"))


def rows_for(cfg: Config, prof: Profile, worlds: tuple[int, ...] = (1, 2, 4, 8)) -> list[dict]:
    params = cfg.params()
    rows = []
    for strategy, rbytes, rname in STRATEGIES:
        for link_name, link in LINKS.items():
            for n in worlds:
                if n == 1:
                    continue
                tr = traffic(params, strategy, n, cfg.grad_accum, reduce_bytes=rbytes)
                p = predict(prof, tr, strategy, n, cfg.grad_accum, link)
                payload = sum(tr.as_dict().values())
                tokens = cfg.batch * cfg.seq * cfg.grad_accum
                rows.append(
                    dict(
                        strategy=strategy,
                        reduce=rname,
                        link=link_name,
                        gpus=n,
                        payload_gb=payload / GB,
                        tokens_s_gpu=tokens / (p["step_ms"] / 1e3),
                        **p,
                    )
                )
    return rows


def markdown(cfg: Config, prof: Profile) -> str:
    params = cfg.params()
    n_train = sum(p.numel for p in params if p.trainable)
    one = cfg.grad_accum * prof.micro_batch_ms + prof.optimizer_ms
    tokens = cfg.batch * cfg.seq * cfg.grad_accum
    lines = [
        f"### {cfg.title}",
        "",
        f"Trainable parameters: {n_train / 1e6:,.1f} M (fp32). One GPU: {one:,.0f} ms an optimizer step "
        f"({tokens / one * 1e3:,.0f} tokens/s); {prof.source}.",
        "",
        "| strategy | reduce | link | payload GB a step | comm ms at 8 | exposed ms at 8 "
        "| step ms at 2 / 4 / 8 | efficiency at 2 / 4 / 8 | tokens/s per GPU at 8 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = rows_for(cfg, prof)
    for strategy, _, rname in STRATEGIES:
        for link in LINKS:
            by_n = {
                r["gpus"]: r
                for r in rows
                if (r["strategy"], r["reduce"], r["link"]) == (strategy, rname, link)
            }
            last = by_n[max(by_n)]
            steps = " / ".join(f"{by_n[n]['step_ms']:,.0f}" for n in sorted(by_n))
            effs = " / ".join(f"{by_n[n]['efficiency']:.0%}" for n in sorted(by_n))
            lines.append(
                f"| {strategy} | {rname} | {link} | {last['payload_gb']:.2f} | {last['comm_ms']:,.0f} | "
                f"{last['exposed_ms']:,.0f} | {steps} | {effs} | {last['tokens_s_gpu']:,.0f} |"
            )
    return "\n".join(lines)


def links_markdown() -> str:
    lines = [
        "| link | bus bandwidth GB/s | latency per collective µs | why (an assumption) |",
        "|---|---|---|---|",
    ]
    for name, link in LINKS.items():
        lines.append(f"| {name} | {link.busbw_gbs:g} | {link.latency_us:g} | {link.source} |")
    return "\n".join(lines)


def load_profile(path: str) -> Profile:
    d = json.loads(Path(path).read_text())
    try:
        return Profile(
            float(d["micro_batch_ms"]),
            float(d.get("backward_ms", BACKWARD_SHARE * float(d["micro_batch_ms"]))),
            float(d.get("optimizer_ms", 0.0)),
            str(d.get("source", f"measured ({path})")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"scaling.py: profile {path} needs a number for micro_batch_ms ({e})") from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), action="append", help="default: all")
    ap.add_argument("--profile", help="JSON with micro_batch_ms, backward_ms, optimizer_ms (one config only)")
    ap.add_argument("--markdown", help="also write the tables to this file")
    ap.add_argument(
        "--link",
        action="append",
        default=[],
        metavar="NAME=GBPS",
        help="a link of your own (e.g. a measured nccl-tests all_reduce busbw); repeat for more",
    )
    a = ap.parse_args(argv)
    for spec in a.link:
        name, _, gbps = spec.partition("=")
        try:
            LINKS[name.strip()] = Link(float(gbps), 30.0, "given on the command line")
        except ValueError:
            raise SystemExit(f"scaling.py: --link wants NAME=GB/s, got {spec!r}") from None
    names = a.config or list(CONFIGS)
    if a.profile and len(names) != 1:
        raise SystemExit("scaling.py: --profile applies to one --config")
    parts = ["Links (assumed):", "", links_markdown()]
    for name in names:
        cfg = CONFIGS[name]
        prof = load_profile(a.profile) if a.profile else cfg.profile(cfg.params())
        parts += ["", markdown(cfg, prof)]
    text = "\n".join(parts) + "\n"
    print(text, end="")
    if a.markdown:
        Path(a.markdown).write_text(text)


if __name__ == "__main__":
    main()
