"""One variant of the continued-pretraining recipe in this process, through its stack's real trainer.

The recipe (Unsloth's CPT notebook): 4-bit NF4 base; LoRA r=128, alpha=32, rsLoRA, dropout 0 on
q,k,v,o,gate,up,down; embed_tokens and lm_head trained as full copies at their own learning rate
(lr 5e-5, embedding lr 1e-5); 8-bit AdamW, weight decay 0.01, linear schedule, warmup 10; batch
2 x 2048, gradient accumulation 8 (32,768 tokens an optimizer step); bf16; gradient checkpointing.

Every variant reads the same random-weight HF directory (with a word-level tokenizer of the shape's
exact vocabulary) and the same corpus: a JSON-lines file of documents of `seq - 1` words, to which each
stack adds its EOS (snuggle by itself, the peers as the notebook does), so every document is exactly
`seq` tokens, one training row, and no stack pads.

    snuggle          `snuggle train CONFIG` in a subprocess (the CLI, no private hooks); metrics.jsonl
    unsloth-logits   FastLanguageModel 4-bit + get_peft_model(embed_tokens, lm_head in target_modules),
                     UnslothTrainer + UnslothTrainingArguments(embedding_learning_rate), adamw_8bit,
                     use_gradient_checkpointing="unsloth", UNSLOTH_RETURN_LOGITS=1 (as the notebook)
    unsloth          the same without UNSLOTH_RETURN_LOGITS
    hf               transformers Trainer + PEFT (modules_to_save embeddings) + bitsandbytes NF4

Each stack's allocator setting is its own: nothing here touches CUDA before the stack is imported
(Unsloth sets `expandable_segments` when imported; snuggle when it trains; HF keeps the default).

usage: python benchmarks/cpt.py --stack snuggle --shape llama3-8b [--cap 24] [--warmup 2 --steps 5]
       python benchmarks/cpt.py --prepare --shape llama3-8b       (the model directory and corpus)
prints one JSON line (also when the run fails: {"error": ...}).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EMBEDDINGS = ["embed_tokens", "lm_head"]
STACKS = ("snuggle", "unsloth", "unsloth-logits", "hf")
# unk, bos, eos, pad: ids 0..3; documents use words t4 .. t{vocab-1}. Special tokens are matched in the
# text before it is split into words, so none may be a prefix of a word ("t3" would cut "t315" in two)
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")

SHAPES = {
    # Mistral-7B-v0.3: vocabulary 32,768, the notebook's model
    "mistral7b": dict(
        family="mistral",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=32768,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    ),
    # Llama-3-8B: vocabulary 128,256, so the trained embeddings are 2 x 525M parameters
    "llama3-8b": dict(
        family="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    # a few milliseconds a step on a CPU: the harness's own tests
    "tiny": dict(
        family="mistral",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=509,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
}


def hf_config(shape: str):
    from transformers import LlamaConfig, MistralConfig

    s = dict(SHAPES[shape])
    family = s.pop("family")
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3, rms_norm_eps=1e-5)
    if family == "mistral":
        return MistralConfig(**s, **ids, sliding_window=None)
    return LlamaConfig(**s, **ids)


def default_work(shape: str, seq: int, docs: int) -> Path:
    return Path(os.environ.get("SNUGGLE_CPT_WORK", "/tmp/snuggle-cpt")) / f"{shape}-{seq}-{docs}"


def prepare(shape: str, work: Path, seq: int, docs: int, device: str = "cpu") -> tuple[Path, Path]:
    """(model directory, corpus) under `work`, written once: random bf16 weights seeded by parameter
    name (bench.init_weights), a word-level tokenizer of the exact vocabulary, and `docs` documents of
    `seq - 1` words drawn from a Zipf law over the vocabulary (as text is: a few tokens common, most
    rare, so a step's embed_tokens gradient touches a realistic share of rows)."""
    sys.path.insert(0, str(HERE))
    from bench import init_rope_buffers, init_weights
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model_dir, corpus = work / "model", work / "corpus.jsonl"
    cfg = hf_config(shape)
    if not (model_dir / "config.json").exists():
        tmp = work / "model.part"
        dtype = torch.float32 if shape == "tiny" else torch.bfloat16
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.to_empty(device=device)
        init_weights(model.named_parameters())
        init_rope_buffers(model)
        model.save_pretrained(tmp, max_shard_size="5GB")
        del model
        vocab = {**{s: i for i, s in enumerate(SPECIALS)}, **{f"t{i}": i for i in range(4, cfg.vocab_size)}}
        tok = Tokenizer(WordLevel(vocab, unk_token=SPECIALS[0]))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token=SPECIALS[0],
            bos_token=SPECIALS[1],
            eos_token=SPECIALS[2],
            pad_token=SPECIALS[3],
            model_max_length=cfg.max_position_embeddings,
        )
        fast.save_pretrained(tmp)
        tmp.rename(model_dir)
    if not corpus.exists():
        rng = np.random.default_rng(0)
        order = rng.permutation(cfg.vocab_size - 4) + 4  # which token is the most common, and so on
        part = corpus.with_suffix(".part")
        with open(part, "w") as fh:
            for _ in range(docs):
                ranks = (rng.zipf(1.1, seq - 1) - 1) % (cfg.vocab_size - 4)
                fh.write(json.dumps({"text": " ".join(f"t{i}" for i in order[ranks])}) + "\n")
        part.rename(corpus)
    return model_dir, corpus


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """The recipe's linear schedule as snuggle runs it: warmup (step+1)/warmup, then linear to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 1.0 - min(1.0, (step - warmup) / max(1, steps - warmup))


# --- snuggle ---------------------------------------------------------------------------------------


def snuggle_config(a, model_dir: Path, corpus: Path, out: Path) -> dict:
    on_gpu = torch.cuda.is_available()
    return {
        "model": {
            "path": str(model_dir),
            "dtype": "bfloat16" if on_gpu else "float32",
            "quantize": a.quantize,
            "adapter": a.adapter or None,
        },
        "lora": {
            "r": a.r,
            "alpha": 32.0,
            "rslora": True,
            "dropout": 0.0,
            "targets": "all-linear",
            "train_embeddings": True,
        },
        "data": {
            "train": str(corpus),
            "seq_len": a.seq,
            "val_fraction": 0.0,
            "cache_dir": str(out.parent / "token-cache"),
        },
        "train": {
            "steps": a.warmup + a.steps,
            "batch_size": a.batch,
            "grad_accum": a.grad_accum,
            "lr": 5e-5,
            "embedding_lr": 1e-5,
            "weight_decay": 0.01,
            "warmup_steps": 10,
            "schedule": "linear",
            "optimizer": a.optim,
            "max_grad_norm": 1.0,
            "seed": 3407,
            "memory_budget_gib": a.cap or None,
            "embedding_offload": a.embedding_offload,
            "progress": False,
            "output_dir": str(out),
        },
    }


def run_snuggle(a, model_dir: Path, corpus: Path) -> dict:
    import yaml

    out = Path(a.out_dir) / f"snuggle-{a.shape}-cap{a.cap:g}"
    cfg_path = out.with_suffix(".yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(snuggle_config(a, model_dir, corpus, out), sort_keys=False))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "snuggle", "train", str(cfg_path)]
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"snuggle train exited {p.returncode}: {tail}"[:300]}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    res = summarize(
        [r["step_time_s"] for r in steps], [r["loss"] for r in steps], max(r["mem_gib"] for r in steps), a
    )
    res["plan"] = next(
        (ln for ln in p.stdout.splitlines() + p.stderr.splitlines() if "memory plan" in ln), ""
    )
    res["process_wall_s"] = round(wall, 1)
    res["embeddings_changed"] = snuggle_embeddings_changed(out, model_dir)
    shutil.rmtree(out)  # its checkpoint holds the embedding copies and their state: GBs a row
    return res


def snuggle_embeddings_changed(out: Path, model_dir: Path) -> dict[str, float]:
    """Largest change of each trained embedding copy against the base weights (0: it never trained)."""
    from safetensors import safe_open

    latest = out / (out / "latest").read_text().strip() / "trainable.safetensors"
    names = {"model.embed_tokens.weight": "embed_tokens", "lm_head.weight": "lm_head"}
    base = _base_tensors(model_dir, list(names))
    changed = {}
    with safe_open(str(latest), "pt") as f:
        for name, short in names.items():
            changed[short] = float((f.get_tensor(name).float() - base[name].float()).abs().max())
    return changed


def _base_tensors(model_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for n in names:
                if n in f.keys():
                    out[n] = f.get_tensor(n)
    return out


# --- peers -----------------------------------------------------------------------------------------


def step_clock():
    """A transformers TrainerCallback that keeps each optimizer step's seconds (the GPU drained at
    both ends) and its logged loss (logging_steps=1: the step's mean over its micro-batches)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self._t0 = [], [], None

        def _sync(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kw):
            self._sync()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self._sync()
            self.times.append(time.perf_counter() - self._t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return Clock()


def peer_dataset(corpus: Path, eos: str):
    """The corpus as the notebook feeds it: each document's text with the EOS token's text appended."""
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(corpus), split="train")
    return ds.map(lambda ex: {"text": [t + " " + eos for t in ex["text"]]}, batched=True)


def run_unsloth(a, model_dir: Path, corpus: Path) -> dict:
    """Unsloth as its CPT notebook configures it (see the module docstring)."""
    # its switches are read when it is imported: this stack's own, whoever started this process
    for k in ("UNSLOTH_RETURN_LOGITS", "UNSLOTH_GC_KEEP_LAYERS"):
        os.environ.pop(k, None)
    os.environ.update(
        {k: v for k, v in stack_env(a.stack, a.keep_layers).items() if k.startswith("UNSLOTH_")}
    )
    import unsloth  # noqa: F401  (first: it patches transformers, peft and trl, and sets its allocator)
    from unsloth import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments

    apply_cap(a.cap)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(model_dir),
        max_seq_length=a.seq,
        dtype=None,
        load_in_4bit=a.quantize == "nf4",
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=a.r,
        target_modules=TARGETS + EMBEDDINGS,
        lora_alpha=32,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=True,
        loftq_config=None,
    )
    clock = step_clock()
    trainer = UnslothTrainer(
        model=model,
        tokenizer=tokenizer,
        train_dataset=peer_dataset(corpus, tokenizer.eos_token),
        dataset_text_field="text",
        max_seq_length=a.seq,
        dataset_num_proc=2,
        args=UnslothTrainingArguments(
            per_device_train_batch_size=a.batch,
            gradient_accumulation_steps=a.grad_accum,
            max_steps=a.warmup + a.steps,
            warmup_steps=10,
            learning_rate=5e-5,
            embedding_learning_rate=1e-5,
            bf16=True,
            logging_steps=1,
            optim="adamw_8bit" if a.optim == "adamw8bit" else "adamw_torch",
            weight_decay=0.01,
            lr_scheduler_type="linear",
            seed=3407,
            output_dir=str(Path(a.out_dir) / f"unsloth-{a.shape}"),
            report_to="none",
            save_strategy="no",
        ),
        callbacks=[clock],
    )
    trainer.train()
    res = summarize(clock.times, clock.losses, torch.cuda.max_memory_allocated() / 2**30, a)
    res["embeddings_changed"] = peer_embeddings_changed(model, model_dir)
    return res


def run_hf(a, model_dir: Path, corpus: Path) -> dict:
    """transformers Trainer + PEFT (modules_to_save embeddings) + bitsandbytes NF4 with double
    quantization; non-reentrant checkpointing; the trainables (LoRA factors, embedding copies) in fp32,
    as snuggle keeps them; the optimizer's groups and schedule as snuggle's (embedding lr, no decay on
    the embeddings, warmup (step+1)/warmup), so that the curves compare."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    on_gpu = torch.cuda.is_available()
    apply_cap(a.cap)
    kw = {}
    if a.quantize == "nf4":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, device_map={"": 0} if on_gpu else None, **kw
    )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    cfg = LoraConfig(
        r=a.r,
        lora_alpha=32,
        lora_dropout=0.0,
        use_rslora=True,
        target_modules=TARGETS,
        modules_to_save=EMBEDDINGS,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if a.save_init_adapter:
        model.save_pretrained(a.save_init_adapter)  # the starting factors, for snuggle's model.adapter
    steps = a.warmup + a.steps
    opt = hf_optimizer(model, a.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 10, steps))
    ds = peer_dataset(corpus, tokenizer.eos_token)
    ds = ds.map(lambda ex: tokenizer(ex["text"]), batched=True, remove_columns=["text"])
    from transformers import DataCollatorForLanguageModeling

    clock = step_clock()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            per_device_train_batch_size=a.batch,
            gradient_accumulation_steps=a.grad_accum,
            max_steps=steps,
            bf16=on_gpu,
            use_cpu=not on_gpu,
            logging_steps=1,
            max_grad_norm=1.0,
            seed=3407,
            output_dir=str(Path(a.out_dir) / f"hf-{a.shape}"),
            report_to="none",
            save_strategy="no",
            dataloader_num_workers=0,
        ),
        train_dataset=ds,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        optimizers=(opt, sched),
        callbacks=[clock],
    )
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
    res = summarize(clock.times, clock.losses, peak, a)
    res["embeddings_changed"] = peer_embeddings_changed(model, model_dir)
    return res


def hf_optimizer(model, optim: str) -> torch.optim.Optimizer:
    """snuggle's groups: matrices at lr 5e-5 with decay 0.01, the embedding copies at 1e-5 without."""
    emb, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (emb if "modules_to_save" in name else rest).append(p)
    groups = [
        {"params": rest, "lr": 5e-5, "weight_decay": 0.01},
        {"params": emb, "lr": 1e-5, "weight_decay": 0.0},
    ]
    if optim == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, betas=(0.9, 0.999), eps=1e-8)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)


def peer_embeddings_changed(model, model_dir: Path) -> dict[str, float]:
    """Largest change of each modules_to_save copy against the base weights."""
    names = {"model.embed_tokens.weight": "embed_tokens", "lm_head.weight": "lm_head"}
    base = _base_tensors(model_dir, list(names))
    changed = {}
    for name, p in model.named_parameters():
        if "modules_to_save" in name:
            short = next(s for s in names.values() if s in name)
            hf_name = next(n for n, s in names.items() if s == short)
            w = p.detach().float().cpu()
            changed[short] = float((w - base[hf_name].float()).abs().max())
    return changed


def apply_cap(cap: float) -> None:
    """The 24 GB card emulated as the other suites do: a per-process memory fraction."""
    if cap and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total), 0)


# --- the row ---------------------------------------------------------------------------------------


def summarize(times: list[float], losses: list[float], peak_gib: float, a) -> dict:
    """Seconds an optimizer step after `a.warmup` steps (median; mean for the 150-step projection),
    tokens/s, peak, first and last loss, and the whole curve."""
    timed = times[a.warmup :] or times
    step_s = statistics.median(timed)
    tokens = a.batch * a.seq * a.grad_accum
    return {
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "peak_gib": peak_gib,
        "loss_first": losses[0] if losses else float("nan"),
        "loss_last": losses[-1] if losses else float("nan"),
        "wall_150_s": 150 * statistics.fmean(timed),
        "losses": losses,
        "timed_steps": len(timed),
    }


# |snuggle - HF| / HF per step of the parity run: bf16 activations and weights on the GPU round each
# product to 3 significant digits, and 20 steps of AdamW carry those differences forward (1%); fp32 on a
# CPU leaves only the order of summation (measured 8e-8 on the tiny shape; 1e-5 allowed)
PARITY_RTOL = {"bf16": 1e-2, "fp32": 1e-5}


def compare_curves(ours: dict, ref: dict, rtol: float) -> dict:
    """The parity verdict of two rows of one recipe from the same weights, factors and data: the largest
    relative loss difference over the steps, and whether each side's embedding copies changed."""
    a, b = ours.get("losses") or [], ref.get("losses") or []
    if not a or len(a) != len(b):
        return {"parity": False, "why": f"curves of {len(a)} and {len(b)} steps"}
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))
    moved = all(v > 0 for row in (ours, ref) for v in (row.get("embeddings_changed") or {0: 0}).values())
    return {"parity": worst <= rtol and moved, "max_rel_diff": worst, "rtol": rtol, "embeddings_moved": moved}


def stack_env(stack: str, keep_layers: str = "") -> dict[str, str]:
    """The child environment of one stack: the variables its configuration names, and no allocator
    setting inherited from the parent (each stack chooses its own before CUDA starts)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    env.pop("UNSLOTH_RETURN_LOGITS", None)
    env.pop("UNSLOTH_GC_KEEP_LAYERS", None)
    if stack == "unsloth-logits":
        env["UNSLOTH_RETURN_LOGITS"] = "1"
    if stack.startswith("unsloth") and keep_layers:
        env["UNSLOTH_GC_KEEP_LAYERS"] = keep_layers
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stack", choices=STACKS)
    p.add_argument("--shape", default="mistral7b", choices=list(SHAPES))
    p.add_argument("--prepare", action="store_true", help="only write the model directory and corpus")
    p.add_argument("--cap", type=float, default=0.0, help="GiB (a 24 GB card: 24); 0: the whole card")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps before the timed ones")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--r", type=int, default=128)
    p.add_argument("--docs", type=int, default=0, help="documents in the corpus (0: one per row trained)")
    p.add_argument("--quantize", default="nf4", choices=["nf4", "none"])
    p.add_argument("--optim", default="adamw8bit", choices=["adamw8bit", "adamw"])
    p.add_argument("--embedding-offload", default="auto", choices=["auto", "gpu", "cpu"], help="snuggle")
    p.add_argument("--keep-layers", default="", help="unsloth: UNSLOTH_GC_KEEP_LAYERS (e.g. auto)")
    p.add_argument("--adapter", default="", help="snuggle: start from this PEFT adapter (parity)")
    p.add_argument("--save-init-adapter", default="", help="hf: save the starting adapter here (parity)")
    p.add_argument("--work", default="", help="model directory and corpus (default under /tmp)")
    p.add_argument("--out-dir", default="/tmp/snuggle-cpt/runs")
    a = p.parse_args(argv)
    if not a.prepare and not a.stack:
        p.error("--stack is required (or --prepare)")
    if not a.docs:
        a.docs = (a.warmup + a.steps) * a.batch * a.grad_accum
    return a


def row_keys(a: argparse.Namespace) -> dict:
    return dict(
        stack=a.stack,
        shape=a.shape,
        cap_gib=a.cap,
        batch=a.batch,
        seq=a.seq,
        grad_accum=a.grad_accum,
        r=a.r,
        quantize=a.quantize,
        optim=a.optim,
        keep_layers=a.keep_layers,
        embedding_offload=a.embedding_offload if a.stack == "snuggle" else "",
        alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
    )


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    work = Path(a.work) if a.work else default_work(a.shape, a.seq, a.docs)
    if a.prepare:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model_dir, corpus = prepare(a.shape, work, a.seq, a.docs, device)
        print(json.dumps({"model_dir": str(model_dir), "corpus": str(corpus)}), flush=True)
        return
    try:
        # CPU here: a variant's process must not start CUDA before its stack does
        model_dir, corpus = prepare(a.shape, work, a.seq, a.docs)
        run = {"snuggle": run_snuggle, "hf": run_hf}.get(a.stack, run_unsloth)
        res = run(a, model_dir, corpus)
    except torch.OutOfMemoryError:
        res = {"error": "out of memory"}
    except Exception as e:  # a failed variant is a row in the table, not a crash of the harness
        traceback.print_exc(file=sys.stderr)
        res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    print(json.dumps({**res, **row_keys(a)}), flush=True)


if __name__ == "__main__":
    main()
