"""The trainer on 1..N GPUs of one node: tokens/s per GPU, scaling efficiency, MFU, loss-curve agreement.

For each world size of --gpus this launches `torchrun --standalone --nproc-per-node N` running this
file's worker, which calls the real `snuggle.train.loop.train()` (the code path of `snuggle train`):
process group, `train.parallel` ddp/fsdp wrapping, the token cache and batch plan, the loss normalised
over the global step, clipping, AdamW. One process is the plain single-GPU trainer (world size 1
always resolves to `train.parallel=none`), the baseline of the scaling efficiency.

What the worker changes, and why (everything else is the trainer's own code):
- weights: a random-init Llama-3 shape (bench.py's init, from parameter names: every rank builds the
  same model) replaces the safetensors read (`snuggle.io.hf.iter_hf_tensors`, and `hf_tensor_index`
  for FSDP's sharded load), so no 16 GB checkpoint is written or read; the model directory holds
  config.json and a small BPE tokenizer. The tensors go through snuggle.load's own fill (dtype,
  device), LoRA / full fine-tuning / quantization and kernels.
- timing: the loop's progress bar is replaced by one that, on every rank, synchronises CUDA and stamps
  the end of each step (after the update and the loss all-reduce). Steady state = the steps after
  --warmup; a rank's time is the sum of its steady steps; the job's tokens/s is the global tokens over
  the slowest rank's time.
- --memory-cap-gib N: each rank's allocator is held to N GiB (set_per_process_memory_fraction) and,
  where the config has it, train.memory_budget_gib=N lets the trainer's memory plan fit into N.
- the final checkpoint (for 8B full fine-tuning ~100 GB of fp32 weights and Adam state) and its loss
  plot are skipped: they come after the last timed step and are not what is measured.

Data: a synthetic corpus of long documents (random words; rows rarely cross a document boundary, so
attention is a full causal T x T), tokenized once into the trainer's token cache under --out.

MFU = tokens/s per GPU x model FLOPs per token / the GPU's dense bf16 peak (PEAK_TFLOPS by device name,
or --peak-tflops). FLOPs per token: 6N for full fine-tuning, 4N for (Q)LoRA (forward 2N, input gradients
2N; frozen weights get no weight gradient), N = matmul weights incl. lm_head, plus causal attention
6*L*T*d; recomputation (checkpointing) is not counted, as in run.py.

usage:
  python benchmarks/multi_gpu.py --case lora-ddp   --gpus 1,2,4,8 --out DIR         # 8B, 2 x 2048 per GPU
  python benchmarks/multi_gpu.py --case full-fsdp  --gpus 1,2,4,8 --out DIR         # 8B, 1 x 8192, MFU
  python benchmarks/multi_gpu.py --case curves     --gpus 1,2,4   --out DIR         # same global batch
  python benchmarks/multi_gpu.py --case qlora-fsdp --gpus 2 --memory-cap-gib 24 --model-shape 70b --out DIR
  python benchmarks/multi_gpu.py --case curves --device cpu --model-shape tiny --gpus 1,2 --out DIR  # gloo
Writes DIR/multi_gpu-<case>-<shape>-<gpu>-<commit>.{md,json} and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402
from bench import COMMON, _gen  # noqa: E402

SHAPES = {
    **bench.SHAPES,
    # Llama-3.2-3B and Llama-3.1-70B, for the largest shape that trains under a memory cap
    "3b": dict(
        hidden_size=3072,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "70b": dict(
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}

# dense bf16 peak TFLOP/s (datasheet, without sparsity); the first key contained in the device name wins
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
]

# per case: the setups. batch is per GPU; `same_global` keeps the global batch of the largest
# world size at every world size (grad_accum makes up the difference), so the loss curves compare.
CASES: dict[str, dict] = {
    "lora-ddp": dict(shape="8b", lora=True, parallel="ddp", batch=2, seq=2048, ckpt="none", lr=2e-4),
    "full-fsdp": dict(shape="8b", lora=False, parallel="fsdp", batch=1, seq=8192, ckpt="all", lr=1e-5),
    "curves": dict(
        shape="1b", lora=True, parallel="ddp", batch=2, seq=2048, ckpt="none", lr=2e-4, same_global=True
    ),
    "qlora-fsdp": dict(
        shape="8b", lora=True, parallel="fsdp", batch=2, seq=2048, ckpt="auto", lr=2e-4, quantize="nf4"
    ),
}
LORA_R = 16
_WORDS = (
    "the a of to in is on and or cat dog bird fish tree house river stone cloud rain sun moon red green "
    "blue small big old new quick slow runs jumps sleeps eats sees sings reads writes under over near far "
    "bright dark soft loud light heavy warm cold early late north south east west city field road sea"
).split()


# --- arithmetic -------------------------------------------------------------------------------------


def matmul_params(shape: str) -> int:
    """Matmul weights of a shape, lm_head included (counted once more when tied: it is a matmul)."""
    s = SHAPES[shape]
    d, f, L, V = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = s["num_key_value_heads"] * d // s["num_attention_heads"]
    return L * (2 * d * d + 2 * d * kv + 3 * d * f) + V * d


def flops_per_token(shape: str, seq: int, full: bool) -> float:
    s = SHAPES[shape]
    attention = 6 * s["num_hidden_layers"] * seq * s["hidden_size"]
    return (6 if full else 4) * matmul_params(shape) + attention


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    if override:
        return override
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def plan_world_sizes(requested: list[int], device: str, available: int) -> tuple[list[int], dict[int, str]]:
    """(world sizes to run, {world size: why it is skipped}). On CPU (gloo) any number of processes runs."""
    run, skipped = [], {}
    for n in requested:
        if n < 1:
            raise SystemExit(f"--gpus: world sizes must be >= 1, got {n}")
        if device == "cuda" and n > available:
            skipped[n] = f"skipped: needs {n} GPUs, {available} visible on this machine"
        else:
            run.append(n)
    return run, skipped


def summarize(rank_results: list[dict], warmup: int, tokens_per_step: int) -> dict:
    """One world size's numbers from its ranks' step times (seconds) and rank 0's loss curve."""
    steady = [r["step_s"][warmup:] for r in rank_results]
    if not steady or not all(steady):
        raise ValueError("no steady-state steps: raise --steps")
    slowest = max(sum(s) for s in steady)
    world = len(rank_results)
    tok_s = tokens_per_step * len(steady[0]) / slowest
    return {
        "tokens_per_s": tok_s,
        "tokens_per_s_per_gpu": tok_s / world,
        "step_s": max(statistics.median(s) for s in steady),
        "peak_gib": max(r["peak_gib"] for r in rank_results),
        "peak_gib_per_rank": [round(r["peak_gib"], 3) for r in rank_results],
        "losses": rank_results[0]["losses"],
        "step_s_per_rank": [[round(t, 5) for t in r["step_s"]] for r in rank_results],
    }


def add_comparisons(rows: list[dict]) -> None:
    """Scaling efficiency and loss-curve difference of every row against the smallest world size that ran."""
    done = [r for r in rows if "tokens_per_s" in r]
    if not done:
        return
    base = min(done, key=lambda r: r["gpus"])
    for r in done:
        r["baseline_gpus"] = base["gpus"]
        r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
        if r["global_batch"] == base["global_batch"] and len(r["losses"]) == len(base["losses"]):
            r["curve_max_abs_diff"] = max(
                abs(a - b) for a, b in zip(r["losses"], base["losses"], strict=True)
            )


# --- the model directory and the corpus -------------------------------------------------------------


def write_model_dir(shape: str, out: Path) -> Path:
    """config.json of a Llama-3 shape and a byte-level BPE tokenizer; no weights (the worker makes them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab = min(512, SHAPES[shape]["vocab_size"])
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False)
    rng = random.Random(0)
    tk.train_from_iterator([" ".join(rng.choices(_WORDS, k=200)) for _ in range(50)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(out)
    cfg = LlamaConfig(**SHAPES[shape], **COMMON, bos_token_id=0, eos_token_id=1)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(out)
    (out / "README").write_text(
        "Written by benchmarks/multi_gpu.py: no weights here; its worker generates them at load.\n"
    )
    return out


def write_corpus(out: Path, tokens: int, docs: int = 8) -> Path:
    """`docs` long .txt documents of random words (~1 token a word) totalling about `tokens` tokens."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    per_doc = tokens // docs + 1
    for i in range(docs):
        path = out / f"doc{i:02d}.txt"
        if not path.exists() or path.stat().st_size < 2 * per_doc:
            path.write_text(" ".join(rng.choices(_WORDS, k=per_doc)) + "\n")
    return out


# --- the worker: one rank of one world size ---------------------------------------------------------


def _patch(module, name: str, value) -> None:
    # the loop and loader are other people's files: fail loudly if a name moved, rather than measure
    # something else
    if not hasattr(module, name):
        raise SystemExit(f"multi_gpu.py: {module.__name__}.{name} no longer exists; update the benchmark")
    setattr(module, name, value)


def _random_index(path, *args, **kwargs) -> dict:
    """Stands in for snuggle.io.hf.hf_tensor_index (FSDP's sharded load reads by name, block by block):
    name -> a function making bench.py's init of that tensor on this rank's GPU."""
    import functools

    import torch

    from snuggle.io import hf
    from snuggle.model.args import ModelArgs
    from snuggle.model.decoder import Decoder

    with torch.device("meta"):
        model = Decoder(ModelArgs.from_hf(hf.read_hf_config(Path(path))))
    # a tied lm_head is the embedding's tensor: listed once
    return {name: functools.partial(_random_tensor, name, p.shape) for name, p in model.named_parameters()}


def _random_tensor(name: str, shape) -> object:
    import torch

    on_gpu = os.environ.get("SNUGGLE_BENCH_DEVICE") == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    t = torch.empty(shape, dtype=torch.bfloat16 if on_gpu else torch.float32, device=device)
    if t.ndim >= 2:
        t.normal_(0.0, 0.02, generator=_gen(name, 0, device))
    else:
        t.fill_(1.0)
    return t


def _random_tensors(path, *args, **kwargs):
    """Stands in for snuggle.io.hf.iter_hf_tensors: bench.py's init, generated on this rank's GPU."""
    for name, make in _random_index(path).items():
        yield name, make()


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ["SNUGGLE_BENCH_DEVICE"] = spec["device"]
    import torch

    import snuggle.io.hf as hf
    import snuggle.train.loop as loop
    from snuggle.config import load_config
    from snuggle.errors import SnuggleError
    from snuggle.train.metrics import ProgressBar, peak_memory_gib
    from snuggle.train.parallel import rank_device

    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    cuda = spec["device"] == "cuda"
    record: dict = {"step_s": [], "losses": []}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class TimingBar(ProgressBar):
        def __init__(self, total: int, initial: int, enabled: bool):
            super().__init__(total, initial, enabled)
            sync()
            self.last = time.perf_counter()

        def update(self, loss: float, lr: float, tokens_per_s: float, mem_gib: float, **timing) -> None:
            sync()
            now = time.perf_counter()
            record["step_s"].append(now - self.last)
            record["losses"].append(loss)
            self.last = now
            super().update(loss, lr, tokens_per_s, mem_gib, **timing)

    _patch(hf, "iter_hf_tensors", _random_tensors)
    _patch(hf, "hf_tensor_index", _random_index)
    _patch(loop, "ProgressBar", TimingBar)
    _patch(loop, "save_checkpoint", lambda *a, **k: None)
    _patch(loop, "plot_losses", lambda *a, **k: None)

    if cuda:
        props = torch.cuda.get_device_properties(local)
        record["device_name"], record["device_gib"] = props.name, props.total_memory / 2**30
        if spec.get("memory_cap_gib"):
            frac = min(1.0, spec["memory_cap_gib"] * 2**30 / props.total_memory)
            torch.cuda.set_per_process_memory_fraction(frac, local)
    else:
        record["device_name"], record["device_gib"] = "cpu", None
    result_file = Path(spec["results"]) / f"rank{rank}.json"
    try:
        cfg = load_config(None, spec["overrides"])
        summary = loop.train(cfg)
    except BaseException as e:
        msg = "out of memory" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {e}"
        first = msg.strip().splitlines()[0][:300] if msg.strip() else type(e).__name__
        result_file.write_text(
            json.dumps({"rank": rank, "error": first, "device_name": record["device_name"]})
        )
        if isinstance(e, SnuggleError):
            if not getattr(e, "silent", False):
                print(f"snuggle: error: [rank {rank}] {e}", file=sys.stderr)
            sys.exit(2)
        raise
    record.update(rank=rank, peak_gib=peak_memory_gib(rank_device(cfg.model.device)), summary=summary)
    result_file.write_text(json.dumps(record))


# --- the launcher -----------------------------------------------------------------------------------


def ckpt_overrides(ckpt: str) -> list[str]:
    """auto | none | all | offload | layers:N | layers:N:offload -> train.* overrides.

    auto leaves train.gradient_checkpointing at the trainer's default (its memory plan, which fits
    checkpointing and offload into train.memory_budget_gib or the card).
    """
    if ckpt == "auto":
        return []
    if ckpt == "none":
        return ["train.gradient_checkpointing=false"]
    out = ["train.gradient_checkpointing=true"]
    if ckpt == "all":
        return out
    if ckpt == "offload":
        return out + ["train.offload_activations=true"]
    parts = ckpt.split(":")
    if (
        parts[0] == "layers"
        and len(parts) in (2, 3)
        and parts[1].isdigit()
        and parts[2:] in ([], ["offload"])
    ):
        return out + [f"train.checkpoint_layers={parts[1]}", f"train.offload_activations={len(parts) == 3}"]
    raise SystemExit(f"--ckpt: expected auto, none, all, offload, layers:N or layers:N:offload, got {ckpt!r}")


def config_has(section: str, key: str) -> bool:
    """Whether this snuggle's config knows `section.key` (keys other people are adding right now)."""
    from snuggle import config

    cls = {"model": config.ModelConfig, "train": config.TrainConfig}[section]
    return key in {f.name for f in dataclasses.fields(cls)}


def launch(world: int, spec: dict, run_dir: Path, timeout: int) -> tuple[list[dict] | str, str | None]:
    """Run one world size: (its ranks' result dicts, or an error line; the GPU's name if a rank said)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    results = run_dir / "ranks"
    results.mkdir(parents=True)
    spec = {**spec, "results": str(results)}
    spec_file = run_dir / "spec.json"
    spec_file.write_text(json.dumps(spec, indent=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    cmd += [str(Path(__file__).resolve()), "--worker", str(spec_file)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    log = run_dir / "launch.log"
    with open(log, "w") as fh:
        # its own session, so a timeout stops the agent and every worker it started
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            return f"timeout after {timeout} s (log: {log})", None
    ranks = [json.loads(f.read_text()) for f in sorted(results.glob("rank*.json"))]
    name = next((r["device_name"] for r in ranks if r.get("device_name")), None)
    errors = [r for r in ranks if "error" in r]
    if errors:
        return f"rank {errors[0]['rank']}: {errors[0]['error']}", name
    if p.returncode != 0 or len(ranks) != world:
        lines = log.read_text(errors="replace").splitlines()
        said = [ln for ln in lines if "snuggle: error" in ln or "Error" in ln] or lines or ["no output"]
        return f"exit status {p.returncode}: {said[-1].strip()[:300]} (log: {log})", name
    return sorted(ranks, key=lambda r: r["rank"]), name


def environment() -> dict:
    import torch

    commit = os.environ.get("SNUGGLE_COMMIT")
    if not commit:
        try:
            commit = subprocess.check_output(
                ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True, stderr=subprocess.DEVNULL
            ).strip()
        except Exception:
            commit = "unknown"
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "commit": commit}


def fmt_row(r: dict, show_mfu: bool) -> str:
    head = f"| {r['gpus']} | {r['parallel']} | {r['global_batch']} x {r['seq']} |"
    if "tokens_per_s" not in r:
        return head + f" {r.get('error') or r.get('skipped')} |" + " |" * 7
    curve = r.get("curve_max_abs_diff")
    mfu = f"{r['mfu']:.1%}" if show_mfu and r.get("mfu") is not None else "n/a"
    return (
        head + f" {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | "
        f"{r['scaling_efficiency']:.1%} | {r['step_s']:.3f} | {mfu} | {r['peak_gib']:.2f} | "
        f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} | {'n/a' if curve is None else f'{curve:.2e}'} |"
    )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", required=True, choices=list(CASES))
    ap.add_argument("--gpus", default="1,2,4,8", help="world sizes, comma-separated (processes on CPU)")
    ap.add_argument("--model-shape", choices=list(SHAPES), help="Llama-3 shape (default: the case's)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gloo, fp32")
    ap.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    ap.add_argument("--batch", type=int, help="rows per GPU per micro-batch (default: the case's)")
    ap.add_argument("--seq", type=int, help="tokens per row (default: the case's)")
    ap.add_argument("--global-batch", type=int, help="curves: rows per step at every world size")
    ap.add_argument(
        "--ckpt", help="auto | none | all | offload | layers:N | layers:N:offload (default: the case's)"
    )
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], help="default: the case's")
    ap.add_argument(
        "--memory-cap-gib",
        type=float,
        default=0.0,
        help="per-GPU cap: set_per_process_memory_fraction, and train.memory_budget_gib where it exists",
    )
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (default: by device name)")
    ap.add_argument("--dist-timeout-s", type=float, default=600.0)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per world size")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import torch

    case = {**CASES[a.case]}
    shape = a.model_shape or case["shape"]
    batch, seq = a.batch or case["batch"], a.seq or case["seq"]
    parallel, ckpt = a.parallel or case["parallel"], a.ckpt or case["ckpt"]
    if a.warmup < 1 or a.steps < 1:
        raise SystemExit("--warmup and --steps must be >= 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: use --device cpu (gloo) for a functional run")
    requested = [int(x) for x in a.gpus.split(",") if x.strip()]
    available = torch.cuda.device_count() if a.device == "cuda" else os.cpu_count() or 1
    worlds, skipped = plan_world_sizes(requested, a.device, available)
    for n, msg in skipped.items():
        print(f"multi_gpu: {n} GPUs: {msg}", file=sys.stderr)
    global_batch = a.global_batch or max(worlds or [1]) * batch
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = write_model_dir(shape, out / f"model-{shape}")
    rows_needed = max(64, 4 * max(global_batch, max(worlds or [1]) * batch))
    corpus = write_corpus(out / f"corpus-{seq}", rows_needed * seq)
    full = not case["lora"]
    no_quantize = case.get("quantize") and not config_has("model", "quantize")

    rows: list[dict] = []
    for n, msg in skipped.items():
        rows.append({"gpus": n, "parallel": parallel, "global_batch": n * batch, "seq": seq, "skipped": msg})
    for world in worlds:
        if case.get("same_global"):
            if global_batch % (world * batch):
                raise SystemExit(f"--global-batch {global_batch} is not a multiple of {world} GPUs x {batch}")
            accum, gb = global_batch // (world * batch), global_batch
        else:
            accum, gb = 1, world * batch
        row = {"gpus": world, "parallel": parallel if world > 1 else "none", "global_batch": gb, "seq": seq}
        rows.append(row)
        if no_quantize:
            row["skipped"] = "model.quantize is not a config key of this snuggle yet (QLoRA not landed)"
            print(f"multi_gpu: {world} GPUs: {row['skipped']}", file=sys.stderr)
            continue
        overrides = [
            f"model.path={model_dir}",
            f"model.device={a.device}",
            f"model.dtype={'bfloat16' if a.device == 'cuda' else 'float32'}",
            f"data.train={corpus}",
            f"data.cache_dir={out / 'token-cache'}",
            f"data.seq_len={seq}",
            "data.val_fraction=0",
            f"train.steps={a.warmup + a.steps}",
            f"train.batch_size={batch}",
            f"train.grad_accum={accum}",
            f"train.lr={case['lr']}",
            "train.warmup_steps=0",
            f"train.parallel={parallel}",
            "train.progress=false",
            f"train.dist_timeout_s={a.dist_timeout_s}",
            f"train.output_dir={out / 'runs' / f'{a.case}-{shape}-{world}' / 'run'}",
            *ckpt_overrides(ckpt),
        ]
        overrides += (
            [f"lora.r={LORA_R}", f"lora.alpha={LORA_R}", "lora.targets=all-linear"]
            if not full
            else ["lora=null"]
        )
        if case.get("quantize"):
            overrides.append(f"model.quantize={case['quantize']}")
        if a.memory_cap_gib and config_has("train", "memory_budget_gib"):
            overrides.append(f"train.memory_budget_gib={a.memory_cap_gib}")  # the memory plan fits the cap
        overrides += a.set
        spec = {"device": a.device, "overrides": overrides, "memory_cap_gib": a.memory_cap_gib}
        t0 = time.monotonic()
        got, row["device_name"] = launch(world, spec, out / "runs" / f"{a.case}-{shape}-{world}", a.timeout)
        if isinstance(got, str):
            row["error"] = got
            print(f"multi_gpu: {world} GPUs: {got}", file=sys.stderr)
            continue
        row.update(summarize(got, a.warmup, gb * seq))
        row["wall_s"] = round(time.monotonic() - t0, 1)
        print(
            f"multi_gpu: {world} GPUs: {row['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU", file=sys.stderr
        )
    rows.sort(key=lambda r: r["gpus"])
    add_comparisons(rows)

    env = environment()
    gpu = next((r["device_name"] for r in rows if r.get("device_name")), "cpu" if a.device == "cpu" else "?")
    peak = peak_tflops(gpu, a.peak_tflops) if a.device == "cuda" or a.peak_tflops else None
    fpt = flops_per_token(shape, seq, full)
    for r in rows:
        if "tokens_per_s" in r:
            r["mfu"] = r["tokens_per_s_per_gpu"] * fpt / (peak * 1e12) if peak else None
    settings = {
        "case": a.case,
        "shape": shape,
        "mode": "full fine-tuning"
        if full
        else f"LoRA r={LORA_R} all-linear" + (" + nf4" if case.get("quantize") else ""),
        "batch_per_gpu": batch,
        "seq": seq,
        "ckpt": ckpt,
        "memory_cap_gib": a.memory_cap_gib,
        "warmup": a.warmup,
        "steps": a.steps,
        "extra": a.set,
        "peak_tflops": peak,
        "flops_per_token": fpt,
    }
    base = next((r["baseline_gpus"] for r in rows if "baseline_gpus" in r), 1)
    show_mfu = peak is not None
    lines = [
        f"# snuggle multi-GPU benchmark `{a.case}`: {shape}, {settings['mode']}",
        "",
        f"{gpu}; torch {env['torch']}, CUDA {env['cuda']}; commit {env['commit']}",
        f"batch {batch} x {seq} per GPU"
        + (f" (global batch {global_batch} rows at every world size)" if case.get("same_global") else "")
        + f", checkpointing {ckpt}"
        + (f", capped at {a.memory_cap_gib:g} GiB per GPU" if a.memory_cap_gib else "")
        + f"; {a.warmup} warm-up + {a.steps} timed steps; extra: {' '.join(a.set) or 'none'}",
        f"MFU: {'6N' if full else '4N'} + 6LTd = {fpt / 1e9:.2f} GFLOP/token over "
        + (f"{peak:g} TFLOP/s dense bf16" if peak else "no known peak (n/a)"),
        "",
        f"| GPUs | parallel | global batch | tokens/s | tokens/s per GPU | scaling eff. vs {base} | step s "
        f"| MFU | peak GiB (max rank) | loss first -> last | max abs loss diff vs {base} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(fmt_row(r, show_mfu) for r in rows),
    ]
    table = "\n".join(lines) + "\n"
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", f"multi_gpu-{a.case}-{shape}-{gpu}-{env['commit']}")
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(
        json.dumps({"env": {**env, "gpu": gpu}, "settings": settings, "rows": rows}, indent=1)
    )
    print(table)
    print(f"written: {out / stem}.md, .json", file=sys.stderr)


if __name__ == "__main__":
    main()
