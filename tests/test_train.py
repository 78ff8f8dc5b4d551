"""The trainer end to end on tiny models: what trains, at which lr, accumulation, exact resume, metrics.

Every run is a few steps of a 2-layer model on rows of 16 tokens, so a whole `train()` call takes well
under a second; assertions compare tensors exactly (bit-identical) wherever the maths allows it.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import snuggle.train.loop as loop_mod
from snuggle.config import RunConfig, load_config
from snuggle.data import BatchPlan
from snuggle.errors import SnuggleError
from snuggle.load import load
from snuggle.lora import ALL_LINEAR, LoRALinear
from snuggle.model.decoder import Decoder
from snuggle.rebuild import load_run
from snuggle.train.checkpoint import latest_checkpoint
from snuggle.train.loop import train
from snuggle.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from snuggle.train.setup import build_data, build_model

pytestmark = pytest.mark.usefixtures("single_thread")

EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")
# metrics.jsonl keys that measure the machine, not the run; everything else must replay exactly
TIMING_KEYS = ("tokens_per_s", "step_time_s", "mem_gib")

_NOUNS = "cat dog bird fish".split()
_ADJS = "red green blue small big old".split()
_VERBS = "sees eats reads writes".split()
_ONE_TOKEN_WORDS = "a in is on".split()  # one token each in the fixture's tokenizer


def learnable_docs(n: int, seed: int = 0) -> list[str]:
    """Sentences from a tiny grammar: after a few steps a model predicts most of their tokens."""
    rng = random.Random(seed)
    return [
        " ".join(
            f"the {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)}."
            for _ in range(rng.randint(1, 3))
        )
        for _ in range(n)
    ]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def make_cfg(model_dir: Path, corpus: Path, out: Path, *overrides: str) -> RunConfig:
    """A small, fast run; `overrides` win over these defaults."""
    base = [
        f"model.path={model_dir}",
        f"data.train={corpus}",
        f"data.cache_dir={out.parent / 'token-cache'}",
        "data.seq_len=16",
        "data.val_fraction=0",
        "lora.r=4",
        "train.steps=3",
        "train.batch_size=2",
        "train.lr=0.01",
        "train.progress=false",
        f"train.output_dir={out}",
    ]
    return load_config(None, [*base, *overrides])


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def replayable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def checkpoint_tensors(out: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(out)
    assert ckpt is not None, f"no complete checkpoint in {out}"
    return load_file(str(ckpt / "trainable.safetensors"))


def base_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def lora_names(num_layers: int = 2) -> set[str]:
    names = set()
    for layer in range(num_layers):
        for t in ALL_LINEAR:
            parent = "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            names |= {f"model.layers.{layer}.{parent}.{t}.lora_{ab}" for ab in "AB"}
    return names


@pytest.fixture
def capture_model(monkeypatch):
    """Keeps the live model that `train()` builds, so tests can inspect it after training."""
    models = []

    def build_and_keep(cfg):
        model, tok = build_model(cfg)
        models.append(model)
        return model, tok

    monkeypatch.setattr(loop_mod, "build_model", build_and_keep)
    return models


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", learnable_docs(60))


# --- what trains ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "tie"), [("llama", False), ("qwen2", True)], ids=["untied", "tied"])
def test_lora_cpt_trains_embeddings_adapters_and_nothing_else(
    tiny_hf_model, tmp_path, corpus, capture_model, family, tie
):
    model_dir, _ = tiny_hf_model(family, tie, tmp_path)
    out = tmp_path / "run"
    cfg = make_cfg(model_dir, corpus, out, "lora.train_embeddings=true", "train.embedding_lr=0.01")
    torch.manual_seed(cfg.train.seed)  # what train() does before building: the same LoRA A init
    init = {n: p.detach().clone() for n, p in build_model(cfg)[0].named_parameters() if "lora_" in n}
    base = base_tensors(model_dir)
    assert ("lm_head.weight" in base) is not tie

    train(cfg)

    saved = checkpoint_tensors(out)
    # a tied lm_head is the embedding itself: saved once, under the embedding's name
    expected = lora_names() | {"model.embed_tokens.weight"} | (set() if tie else {"lm_head.weight"})
    assert set(saved) == expected
    for name in lora_names():
        assert not torch.equal(saved[name], init[name]), f"{name} did not train"
        if name.endswith("lora_B"):
            assert torch.equal(init[name], torch.zeros_like(init[name]))  # B starts at 0 ...
            assert saved[name].abs().max() > 1e-4  # ... and moved away from it
    for name in ("model.embed_tokens.weight",) + (() if tie else ("lm_head.weight",)):
        assert saved[name].dtype == torch.float32
        assert (saved[name] - base[name]).abs().max() > 1e-3, f"{name} did not train"
    if not tie:
        # two separately trained matrices, not one tensor saved twice
        assert not torch.equal(
            saved["model.embed_tokens.weight"] - base["model.embed_tokens.weight"],
            saved["lm_head.weight"] - base["lm_head.weight"],
        )

    (live,) = capture_model
    rebuilt, _, run_cfg = load_run(out)
    assert run_cfg == cfg
    for model in (live, rebuilt):
        if tie:
            assert model.lm_head.weight is model.model.embed_tokens.weight  # still one shared tensor
        params = dict(model.named_parameters(remove_duplicate=False))
        assert set(params) == set(base) | lora_names() | {"lm_head.weight"}
        for name, p in params.items():
            if name in saved:
                assert torch.equal(p.detach(), saved[name]), name
                assert p.requires_grad, name
            elif name == "lm_head.weight":  # tied: checked by identity above
                assert tie
            else:
                # every frozen weight of the base model, bit for bit (and still frozen)
                assert torch.equal(p.detach(), base[name]), f"frozen {name} changed"
                assert not p.requires_grad, name


def test_embedding_group_uses_embedding_lr(tiny_hf_model, tmp_path, corpus):
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    cfg = make_cfg(model_dir, corpus, tmp_path / "x", "lora.train_embeddings=true", "train.embedding_lr=1e-5")
    model, _ = build_model(cfg)
    groups = {g["name"]: g for g in param_groups(model, cfg.train)}
    assert set(groups) == {"decay", "embeddings"}  # LoRA factors are 2-d; nothing else trains
    emb = groups["embeddings"]
    assert emb["lr"] == 1e-5 and emb["weight_decay"] == 0.0
    assert {id(p) for p in emb["params"]} == {id(model.model.embed_tokens.weight), id(model.lm_head.weight)}
    assert groups["decay"]["lr"] == 0.01
    lora_params = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert {id(p) for p in groups["decay"]["params"]} == lora_params
    # without embedding_lr the embeddings train at lr
    assert {g["name"]: g["lr"] for g in param_groups(model, make_cfg(model_dir, corpus, tmp_path).train)} == {
        "decay": 0.01,
        "embeddings": 0.01,
    }

    # and the optimizer of a real run moves the embeddings by ~embedding_lr per step, not by lr
    moved = {}
    for emb_lr in (1e-5, 1e-2):
        out = tmp_path / f"run-{emb_lr}"
        run_cfg = make_cfg(
            model_dir, corpus, out, "lora.train_embeddings=true", f"train.embedding_lr={emb_lr}"
        )
        train(run_cfg)
        saved, base = checkpoint_tensors(out), base_tensors(model_dir)
        moved[emb_lr] = max(float((saved[n] - base[n]).abs().max()) for n in EMBEDDINGS)
        lora_b = max(float(saved[n].abs().max()) for n in lora_names() if n.endswith("lora_B"))
        assert lora_b > 1e-3  # the adapters trained at lr=0.01 in both runs
    # an Adam update is at most ~3 lr per element (1-b1)/sqrt(1-b2); 3 steps
    assert 0 < moved[1e-5] < 3 * 3.2e-5
    assert moved[1e-2] > 5e-3
    assert moved[1e-2] > 100 * moved[1e-5]


@pytest.mark.parametrize(
    ("override", "tie"), [("lora=null", False), ("lora.enabled=false", True)], ids=["lora-null", "disabled"]
)
def test_full_finetuning_trains_every_parameter(
    tiny_hf_model, tmp_path, corpus, capture_model, override, tie
):
    model_dir, _ = tiny_hf_model("qwen3", tie, tmp_path)
    out = tmp_path / "run"
    cfg = make_cfg(model_dir, corpus, out, override, "train.steps=2")
    assert not cfg.use_lora
    train(cfg)

    base = base_tensors(model_dir)
    saved = checkpoint_tensors(out)
    assert set(saved) == set(base)  # every weight of the model (a tied lm_head once, as embed_tokens)
    for name, t in saved.items():
        assert t.dtype == torch.float32
        assert not torch.equal(t, base[name]), f"{name} did not train"
    (live,) = capture_model
    rebuilt, _, _ = load_run(out, device="cpu")
    for model in (live, rebuilt):
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
        for name, p in model.named_parameters():
            assert p.requires_grad and torch.equal(p.detach(), saved[name]), name


# --- gradient accumulation ------------------------------------------------------------------------


def uneven_docs() -> list[str]:
    """Long documents mixed with bursts of one-word documents.

    A packed row's valid targets are its tokens minus one per document boundary, so a row of one-token
    documents (token, EOS, token, EOS, ...) has half the valid targets of a row inside a long document.
    """
    rng = random.Random(5)
    docs = []
    for i in range(24):
        if i % 2:
            docs.extend(rng.choice(_ONE_TOKEN_WORDS) for _ in range(rng.randint(6, 14)))
        else:
            docs.append(learnable_docs(1, seed=i)[0] + " " + learnable_docs(1, seed=100 + i)[0])
    return docs


def micro_mean_loss(mp: pytest.MonkeyPatch, grad_accum: int) -> None:
    """Turn the loop into the classic accumulation bug: each micro-batch's own mean, weighted equally.

    The loop collates all micro-batches of a step, then divides each `loss_sum` by the step's valid
    tokens; rescaling `loss_sum` by n_step / (n_micro * grad_accum) makes that mean_micro / grad_accum.
    """
    pending: list[int] = []
    n_step = {}
    real_collate, real_loss_sum = loop_mod.collate, Decoder.loss_sum

    def collate(rows):
        batch = real_collate(rows)
        pending.append(int((batch["labels"] != -100).sum()))
        return batch

    def loss_sum(self, input_ids, labels, *args):
        if pending:  # first forward of a step
            n_step["n"] = sum(pending)
            pending.clear()
        n_micro = int((labels != -100).sum())
        return real_loss_sum(self, input_ids, labels, *args) * n_step["n"] / (n_micro * grad_accum)

    mp.setattr(loop_mod, "collate", collate)
    mp.setattr(Decoder, "loss_sum", loss_sum)


def test_grad_accumulation_matches_one_big_batch(tiny_hf_model, tmp_path, monkeypatch):
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    corpus = write_jsonl(tmp_path / "uneven.jsonl", uneven_docs())

    def run(bs: int, ga: int, tag: str = "") -> tuple[dict[str, torch.Tensor], list[dict]]:
        out = tmp_path / f"bs{bs}-ga{ga}{tag}"
        # full fine-tuning (every tensor), weight decay and clipping on. lr 1e-3: Adam's first update is
        # lr * g / (|g| + eps), which turns fp32 summation noise on near-zero gradient elements into
        # ~1e-4 lr of parameter difference; at 1e-3 that stays below the 1e-6 asked for.
        train(
            make_cfg(
                model_dir, corpus, out, "lora=null", "train.lr=0.001", "train.weight_decay=0.1",
                f"train.batch_size={bs}", f"train.grad_accum={ga}",
            )
        )  # fmt: skip
        return checkpoint_tensors(out), read_metrics(out)

    ref_params, ref_rows = run(4, 1)
    for bs, ga in [(2, 2), (1, 4)]:
        params, rows = run(bs, ga)
        assert set(params) == set(ref_params)
        for name, t in params.items():
            torch.testing.assert_close(t, ref_params[name], rtol=0, atol=1e-6, msg=f"bs={bs} ga={ga} {name}")
        for r, ref in zip(rows, ref_rows, strict=True):
            assert r["step"] == ref["step"] and r["tokens"] == ref["tokens"]
            assert r["loss"] == pytest.approx(ref["loss"], rel=0, abs=1e-6)
            assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)

    # The corpus makes the normalisation matter: step 0's four rows hold different numbers of valid
    # tokens, so the mean over the step's tokens differs from the mean of per-row (micro-batch) means.
    cfg = make_cfg(model_dir, corpus, tmp_path / "probe", "train.batch_size=1", "train.grad_accum=4")
    model, tok = load(model_dir, dtype="float32", device="cpu")
    data = build_data(cfg.data, tok, cfg.train.seed, model.args.max_position_embeddings)
    plan = BatchPlan(data.train_idx, batch_size=1, grad_accum=4, seed=cfg.train.seed)
    micro = [data.rows.batch(idx) for idx in plan.micro_batches(0)]
    counts = [int((b["labels"] != -100).sum()) for b in micro]
    assert max(counts) >= 1.3 * min(counts), counts
    with torch.no_grad():
        sums = [
            float(model.loss_sum(b["input_ids"], b["labels"], b["position_ids"], b["doc_ids"])) for b in micro
        ]
    token_mean = sum(sums) / sum(counts)
    micro_mean = sum(s / n for s, n in zip(sums, counts, strict=True)) / len(counts)
    assert abs(token_mean - micro_mean) > 1e-3
    # the logged loss of step 1 (before its update) is the token mean, whatever the split
    assert ref_rows[0]["loss"] == pytest.approx(token_mean, rel=0, abs=1e-5)

    # a trainer that averaged micro-batch means would log another loss and end elsewhere: the
    # comparison above has the resolution to tell
    with monkeypatch.context() as mp:
        micro_mean_loss(mp, grad_accum=4)
        params, rows = run(1, 4, tag="-micro-mean")
    assert rows[0]["loss"] == pytest.approx(micro_mean, rel=0, abs=1e-5)
    assert max(float((params[n] - ref_params[n]).abs().max()) for n in params) > 1e-4


# --- resume ---------------------------------------------------------------------------------------


def resume_cfg(model_dir: Path, corpus: Path, out: Path, *extra: str) -> RunConfig:
    # dropout makes the curve depend on the torch RNG, which the checkpoint must restore too
    return make_cfg(
        model_dir,
        corpus,
        out,
        "train.steps=6",
        "train.save_every=2",
        "train.eval_every=2",
        "train.keep_checkpoints=3",
        "data.val_fraction=0.2",
        "train.eval_rows=4",
        "lora.dropout=0.1",
        "lora.train_embeddings=true",
        "train.warmup_steps=2",
        *extra,
    )


def test_resume_replays_the_uninterrupted_run_exactly(tiny_hf_model, tmp_path, corpus, monkeypatch):
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    full = tmp_path / "full"
    train(resume_cfg(model_dir, corpus, full))
    ref_rows = replayable(read_metrics(full))
    ref_params = checkpoint_tensors(full)
    assert [r["step"] for r in ref_rows if "eval_loss" in r] == [0, 2, 4, 6]
    assert [r["step"] for r in ref_rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in full.glob("checkpoint-*")) == [f"checkpoint-{s:07d}" for s in (2, 4, 6)]

    # 1) the later checkpoints gone and `latest` pointing at step 2: resume replays steps 3..6
    rewound = tmp_path / "rewound"
    shutil.copytree(full, rewound)
    for s in (4, 6):
        shutil.rmtree(rewound / f"checkpoint-{s:07d}")
    (rewound / "latest").write_text("checkpoint-0000002")
    summary = train(resume_cfg(model_dir, corpus, rewound, "train.resume=true"))
    assert replayable(read_metrics(rewound)) == ref_rows
    resumed = checkpoint_tensors(rewound)
    assert set(resumed) == set(ref_params)
    for name, t in resumed.items():
        assert torch.equal(t, ref_params[name]), name
    assert "eval_loss_before" not in summary  # no step-0 evaluation on resume
    assert summary["eval_loss"] == ref_rows[-1]["eval_loss"]

    # 2) a real crash in the middle of step 6, after checkpoint 4 and the metrics row of step 5
    crashed = tmp_path / "crashed"
    calls = {"n": 0}
    real_collate = loop_mod.collate

    def crash_at_step_6(rows):
        calls["n"] += 1
        if calls["n"] == 6:  # batch_size 2, grad_accum 1: one collate per step
            raise RuntimeError("simulated crash")
        return real_collate(rows)

    monkeypatch.setattr(loop_mod, "collate", crash_at_step_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(resume_cfg(model_dir, corpus, crashed))
    monkeypatch.setattr(loop_mod, "collate", real_collate)
    assert latest_checkpoint(crashed).name == "checkpoint-0000004"
    assert [r["step"] for r in read_metrics(crashed) if "loss" in r] == [1, 2, 3, 4, 5]
    with open(crashed / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "lo')  # and a row torn by the kill
    train(resume_cfg(model_dir, corpus, crashed, "train.resume=true"))
    assert replayable(read_metrics(crashed)) == ref_rows
    for name, t in checkpoint_tensors(crashed).items():
        assert torch.equal(t, ref_params[name]), name

    # 3) a crash before the first checkpoint: resume=true starts over, without the dead run's rows
    early = tmp_path / "early"
    calls["n"] = 4  # crash in step 2, before checkpoint 2
    monkeypatch.setattr(loop_mod, "collate", crash_at_step_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(resume_cfg(model_dir, corpus, early))
    monkeypatch.setattr(loop_mod, "collate", real_collate)
    assert latest_checkpoint(early) is None and len(read_metrics(early)) == 2  # eval 0, step 1
    train(resume_cfg(model_dir, corpus, early, "train.resume=true"))
    assert replayable(read_metrics(early)) == ref_rows


@pytest.mark.parametrize("exists", [True, False], ids=["empty-dir", "no-dir"])
def test_resume_with_nothing_to_resume_starts_fresh(tiny_hf_model, tmp_path, corpus, exists):
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    ref = tmp_path / "ref"
    train(make_cfg(model_dir, corpus, ref, "data.val_fraction=0.2", "train.eval_rows=2"))
    out = tmp_path / "out"
    if exists:
        out.mkdir()
    summary = train(
        make_cfg(model_dir, corpus, out, "data.val_fraction=0.2", "train.eval_rows=2", "train.resume=true")
    )
    assert "eval_loss_before" in summary  # evaluated at step 0: a fresh start
    # the same run as one started without resume: same base model, same data, same init
    assert replayable(read_metrics(out)) == replayable(read_metrics(ref))
    for name, t in checkpoint_tensors(out).items():
        assert torch.equal(t, checkpoint_tensors(ref)[name]), name


def test_a_corpus_of_one_row_warns_that_nothing_is_held_out(tiny_hf_model, tmp_path):
    # val_fraction > 0 with one packed row: the row trains and evaluation was skipped without a word
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    corpus = tmp_path / "one.jsonl"
    corpus.write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n")
    with pytest.warns(UserWarning, match=r"data.val_fraction=0.5 holds out no rows: .* 1 row of data"):
        cfg = make_cfg(model_dir, corpus, tmp_path / "out", "data.val_fraction=0.5", "train.steps=1")
        summary = train(cfg)
    assert summary["steps"] == 1 and "eval_loss" not in summary


# --- metrics, plot, saved config, learning --------------------------------------------------------


def test_metrics_plot_config_and_held_out_loss_drops(tiny_hf_model, tmp_path):
    model_dir, _ = tiny_hf_model("mistral", True, tmp_path)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", learnable_docs(120, seed=1))
    out = tmp_path / "run"
    cfg = make_cfg(
        model_dir,
        corpus,
        out,
        "train.steps=12",
        "train.eval_every=4",
        "data.val_fraction=0.1",
        "lora.r=8",
        "lora.train_embeddings=true",
        "train.warmup_steps=2",
        "train.schedule=cosine",
        "train.min_lr_ratio=0.1",
    )
    summary = train(cfg)
    rows = read_metrics(out)

    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(steps) + len(evals) == len(rows)  # every row is one or the other
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    for r in steps:
        assert {"step", "loss", "lr", "tokens_per_s"} <= set(r)
        assert math.isfinite(r["loss"]) and r["loss"] > 0 and r["tokens_per_s"] > 0
        # the logged lr is the one the step used: the schedule at the 0-based step index
        assert r["lr"] == pytest.approx(cfg.train.lr * lr_factor(r["step"] - 1, cfg.train), rel=1e-12)
    for r in evals:
        assert {"step", "eval_loss", "eval_ppl"} <= set(r) and r["eval_tokens"] > 0
        assert r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-12)
    assert (summary["eval_loss_before"], summary["eval_loss"]) == (
        evals[0]["eval_loss"],
        evals[-1]["eval_loss"],
    )
    assert summary["final_loss"] == steps[-1]["loss"]

    # training on a learnable corpus lowers the held-out loss by a clear margin
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1.0, evals
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0

    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert not list(out.glob("*.tmp*"))  # no leftovers from the atomic writes
    assert load_config(out / "config.yaml") == cfg


def test_log_every_writes_every_nth_step_and_the_last(tiny_hf_model, tmp_path, corpus):
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    out = tmp_path / "run"
    train(make_cfg(model_dir, corpus, out, "train.steps=5", "train.log_every=2"))
    assert [r["step"] for r in read_metrics(out)] == [2, 4, 5]  # val_fraction 0: no eval rows


def test_output_dir_with_a_run_is_refused_before_anything_is_written(tiny_hf_model, tmp_path, corpus):
    from snuggle.errors import SnuggleError

    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    out = tmp_path / "run"
    train(make_cfg(model_dir, corpus, out))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(SnuggleError, match="holds another run"):
        train(make_cfg(model_dir, corpus, out))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


# --- learning-rate schedule -----------------------------------------------------------------------


def sched_cfg(**kw) -> object:
    return make_cfg(Path("/m"), Path("c.jsonl"), Path("/o"), *(f"train.{k}={v}" for k, v in kw.items())).train


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # steps 10, warmup 2, min_lr_ratio 0.1: warmup (s+1)/2, then progress p = (s-2)/8
        (
            "cosine",
            {
                0: 0.5,
                1: 1.0,
                2: 1.0,
                6: 0.1 + 0.9 * 0.5,
                9: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)),
            },
        ),
        ("linear", {0: 0.5, 1: 1.0, 2: 1.0, 6: 0.1 + 0.9 * 0.5, 9: 0.1 + 0.9 * (1 / 8)}),
        ("constant", {0: 0.5, 1: 1.0, 2: 1.0, 6: 1.0, 9: 1.0}),
    ],
)
def test_lr_factor_warmup_then_schedule(schedule, expected):
    cfg = sched_cfg(steps=10, warmup_steps=2, min_lr_ratio=0.1, schedule=schedule)
    for step, want in expected.items():
        assert lr_factor(step, cfg) == pytest.approx(want, abs=1e-12), (schedule, step)
    # past the end (a run extended on resume) the decay stays at its floor
    if schedule != "constant":
        assert lr_factor(50, cfg) == pytest.approx(0.1, abs=1e-12)


def test_lr_factor_without_warmup_and_cosine_midpoint():
    cfg = sched_cfg(steps=5, warmup_steps=0)
    assert lr_factor(0, cfg) == 1.0  # the first step trains at the peak lr
    assert [round(lr_factor(s, cfg), 12) for s in range(5)] == [
        round(0.5 * (1 + math.cos(math.pi * s / 5)), 12) for s in range(5)
    ]


def test_scheduler_drives_every_group_including_embeddings():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(5, 3)
            self.proj = nn.Linear(3, 3)
            self.lm_head = nn.Linear(3, 5, bias=False)

    cfg = sched_cfg(steps=6, warmup_steps=3, lr=0.1, embedding_lr=0.01, schedule="linear", weight_decay=0.5)
    model = Tiny()
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert {n: len(g["params"]) for n, g in groups.items()} == {"decay": 1, "no_decay": 1, "embeddings": 2}
    assert (groups["decay"]["weight_decay"], groups["no_decay"]["weight_decay"]) == (0.5, 0.0)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    for step in range(6):
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        f = lr_factor(step, cfg)
        assert lrs == pytest.approx(
            {"decay": 0.1 * f, "no_decay": 0.1 * f, "embeddings": 0.01 * f}, rel=1e-12
        )
        opt.step()
        sched.step()


def test_kernels_triton_without_gpu_is_a_clear_error(tiny_hf_model, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path, _ = tiny_hf_model("llama", True, tmp_path)
    corpus = write_jsonl(tmp_path / "c.jsonl", learnable_docs(8))
    cfg = make_cfg(path, corpus, tmp_path / "out", "train.kernels=triton")
    with pytest.raises(SnuggleError, match="train.kernels=triton needs a CUDA GPU"):
        build_model(cfg)
    # auto on CPU keeps the PyTorch reference modules
    model, _ = build_model(make_cfg(path, corpus, tmp_path / "out2", "train.kernels=auto"))
    assert type(model.model.layers[0].mlp.gate_proj) is LoRALinear


def test_lora_init_is_drawn_on_the_cpu_whatever_the_device(tiny_hf_model, tmp_path):
    """The same seed gives the same adapter on any device, so 1-GPU and FSDP runs start equal."""
    path, _ = tiny_hf_model("llama", True, tmp_path)
    model, _ = load(path, with_tokenizer=False)
    torch.manual_seed(7)
    a = LoRALinear(model.model.layers[0].self_attn.q_proj, 4, 8).lora_A.detach().clone()
    torch.manual_seed(7)
    expected = torch.empty_like(a)
    nn.init.kaiming_uniform_(expected, a=math.sqrt(5))
    assert torch.equal(a, expected)


@pytest.mark.parametrize("part", ["optimizer", "trainables"])
def test_resume_from_a_damaged_checkpoint_is_one_error_that_keeps_the_run(tiny_hf_model, tmp_path, part):
    """A truncated shard (a disk that filled, a copy cut short) names the checkpoint and the way back to an
    earlier one; it used to surface as DCP's traceback. Nothing of the run is touched."""
    path, _ = tiny_hf_model("llama", True, tmp_path)
    corpus = write_jsonl(tmp_path / "c.jsonl", learnable_docs(30))
    out = tmp_path / "run"
    const = "train.schedule=constant"  # a longer run is the same curve: only the damage stops it
    train(make_cfg(path, corpus, out, const, "train.steps=2", "train.save_every=1"))
    ckpt = latest_checkpoint(out)
    shard = sorted((ckpt / "optimizer").glob("*.distcp"))[0] if part == "optimizer" else None
    shard = shard or ckpt / "trainable.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(SnuggleError, match="damaged or incompatible checkpoint") as e:
        train(make_cfg(path, corpus, out, const, "train.steps=4", "train.resume=true"))
    assert f"write its name (checkpoint-NNNNNNN) into {out / 'latest'}" in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == before


def test_resume_never_runs_code_a_checkpoint_holds(tiny_hf_model, tmp_path):
    """DCP's default reader unpickles optimizer/.metadata unrestricted: a crafted one ran code on resume."""
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    path, _ = tiny_hf_model("llama", True, tmp_path)
    corpus = write_jsonl(tmp_path / "c.jsonl", learnable_docs(30))
    out = tmp_path / "run"
    const = "train.schedule=constant"
    train(make_cfg(path, corpus, out, const, "train.steps=2"))
    train(
        make_cfg(path, corpus, out, const, "train.steps=3", "train.resume=true")
    )  # the safe reader reads it
    (latest_checkpoint(out) / "optimizer" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(SnuggleError, match="refused posix.system"):
        train(make_cfg(path, corpus, out, const, "train.steps=4", "train.resume=true"))
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("fmt", ["text", "instruct"])
def test_an_unwritable_output_or_cache_dir_is_one_error(tiny_hf_model, tmp_path, fmt):
    """A read-only or impossible path (here under a file: root ignores permissions) was a traceback."""
    path, _ = tiny_hf_model("llama", True, tmp_path)
    if fmt == "text":
        data = write_jsonl(tmp_path / "c.jsonl", learnable_docs(20))
    else:
        data = tmp_path / "i.jsonl"
        data.write_text(json.dumps({"instruction": "name a bird", "output": "the blue bird"}) + "\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    fmt_key, seq = f"data.format={fmt}", "data.seq_len=64"
    with pytest.raises(SnuggleError, match=r"train.output_dir .*a-file/run: cannot create it"):
        train(
            make_cfg(
                path, data, blocker / "run", fmt_key, seq, "train.steps=1", f"data.cache_dir={tmp_path}/c"
            )
        )
    with pytest.raises(SnuggleError, match=r"token cache .*a-file/cache: cannot write it .*data.cache_dir"):
        train(
            make_cfg(
                path, data, tmp_path / "run", fmt_key, "train.steps=1", f"data.cache_dir={blocker}/cache"
            )
        )
    assert not (tmp_path / "run").exists()


def test_resume_from_an_empty_state_file_is_one_error(tiny_hf_model, tmp_path):
    # torch.load of an empty file raises a bare EOFError; quoting its (absent) first line raised an
    # IndexError inside the error handler, a traceback instead of the one line
    path, _ = tiny_hf_model("llama", True, tmp_path)
    corpus = write_jsonl(tmp_path / "c.jsonl", learnable_docs(30))
    out = tmp_path / "run"
    const = "train.schedule=constant"  # a longer run is the same curve: only the damage stops it
    train(make_cfg(path, corpus, out, const, "train.steps=1"))
    (latest_checkpoint(out) / "state.pt").write_bytes(b"")
    with pytest.raises(SnuggleError, match=r"state\.pt: refused or unreadable \(EOFError\)"):
        train(make_cfg(path, corpus, out, const, "train.steps=2", "train.resume=true"))


def test_memory_plan_runs_on_a_cpu_without_triton(tiny_hf_model, tmp_path, corpus):
    """`train.memory_budget_gib` on a machine without triton: the plan is made (the fast path's kernel
    modules, which import triton, are never reached), not a ModuleNotFoundError. CI installs triton,
    so a subprocess is started in which `import triton` fails."""
    import os
    import subprocess
    import sys

    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    shim = tmp_path / "no-triton"
    shim.mkdir()
    # None in sys.modules makes every `import triton` raise ImportError (ModuleNotFoundError's parent)
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['triton'] = None\n")
    script = (
        "import sys, torch\n"
        "from snuggle.config import load_config\n"
        "from snuggle.train.setup import build_model\n"
        "from snuggle.train.memory import memory_plan_for\n"
        f"cfg = load_config(None, ['model.path={model_dir}', 'data.train={corpus}', "
        "'model.device=cpu', 'train.memory_budget_gib=4'])\n"
        "model, _ = build_model(cfg)\n"
        "t = cfg.train\n"
        "plan = memory_plan_for(model, torch.device('cpu'), batch_size=t.batch_size, "
        "seq_len=cfg.data.seq_len, optimizer=t.optimizer, budget_gib=t.memory_budget_gib, "
        "gradient_checkpointing=t.gradient_checkpointing)\n"
        "print(plan.describe())\n"
        "assert 'triton' not in sys.modules or sys.modules['triton'] is None\n"
    )
    src = Path(__file__).resolve().parent.parent / "src"
    env = {**os.environ, "PYTHONPATH": f"{shim}:{src}", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "memory plan for 4.0 GiB" in r.stdout


def test_a_step_the_host_cannot_hold_is_refused_before_training(tiny_hf_model, tmp_path, corpus, monkeypatch):
    """On the CPU, out of memory is a kill (exit 137) with nothing said: the step's peak is predicted
    (the plan's model plus the attention scores the CPU keeps) and a run that would not fit the host's
    available memory stops before training, with the figures and settings that fit, leaving no run."""
    import snuggle.train.memory as memory

    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    out = tmp_path / "run"
    cfg = make_cfg(model_dir, corpus, out, "data.seq_len=64", "model.device=cpu")
    model, _ = build_model(cfg)
    held = memory._tensor_bytes(model)
    need = memory.host_peak_bytes(model, 2, 64) - held
    recomputed = memory.host_peak_bytes(model, 2, 64, checkpoint_layers=2) - held
    assert recomputed < need
    # less than the step needs, enough when every block is recomputed
    monkeypatch.setattr(memory, "host_available_bytes", lambda: (need + recomputed) // 2)
    with pytest.raises(SnuggleError, match="out of host memory ahead") as e:
        train(cfg)
    msg = str(e.value)
    assert "batch 2 x 64 tokens" in msg and "train.gradient_checkpointing=true" in msg, msg
    assert "train.batch_size <= 1" in msg and "data.seq_len <= " in msg, msg
    fits = int(msg.split("data.seq_len <= ")[1].split()[0])
    assert memory.host_peak_bytes(model, 2, fits) - held <= (need + recomputed) // 2
    assert not (out / "config.yaml").exists()
    # the advice holds: recomputing every block, the same run trains
    train(
        make_cfg(
            model_dir, corpus, out, "data.seq_len=64", "model.device=cpu", "train.gradient_checkpointing=true"
        )
    )
    assert (out / "config.yaml").exists()


def test_a_run_killed_before_its_first_checkpoint_says_how_to_start_again(tiny_hf_model, tmp_path, corpus):
    """A run killed before any checkpoint (out of host memory) leaves config.yaml and metrics.jsonl:
    the refusal says there is nothing to continue and that resume=true starts it afresh."""
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("{}\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    with pytest.raises(SnuggleError, match="saved no checkpoint.*train.resume=true to start it afresh"):
        train(make_cfg(model_dir, corpus, out))
    train(make_cfg(model_dir, corpus, out, "train.resume=true"))
    assert latest_checkpoint(out) is not None


@pytest.mark.parametrize(
    ("fmt", "content", "fragment"),
    [
        ("text", '{"body": "a document"}\n', "body"),  # the text is in another field
        ("text", '{"text": "unclosed\n', "malformed JSON"),
        ("instruct", '{"text": "no instruction or messages"}\n', "c.jsonl"),
    ],
)
def test_data_errors_are_said_before_the_model_loads(
    tiny_hf_model, tmp_path, monkeypatch, fmt, content, fragment
):
    """A corpus in the wrong format is one error before the model loads (10-15 s for a 135M model),
    not after it."""
    import snuggle.train.loop as loop

    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(content)

    def never(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(loop, "build_model", never)
    with pytest.raises(SnuggleError, match=fragment):
        train(make_cfg(model_dir, corpus, tmp_path / "run", f"data.format={fmt}"))
    with pytest.raises(SnuggleError, match="data path does not exist"):
        train(make_cfg(model_dir, tmp_path / "missing.jsonl", tmp_path / "run"))


def test_float16_on_the_cpu_is_warned_about(tmp_path, corpus):
    from snuggle.train.setup import check_before_model

    for dtype in ("fp16", "float16"):
        cfg = make_cfg(tmp_path, corpus, tmp_path / "run", f"model.dtype={dtype}")
        with pytest.warns(UserWarning, match=f"model.dtype={dtype} on the CPU trains some 20-30x slower"):
            check_before_model(cfg, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_before_model(make_cfg(tmp_path, corpus, tmp_path / "run"), torch.device("cpu"))


# --- what a person watching the run sees ---------------------------------------------------------


def test_progress_eta_comes_from_steady_steps_and_phases_are_named(capsys, monkeypatch):
    """The first step (warm-up, after the step-0 evaluation) is left out of the remaining time: a
    50 s first step and 1 s steps after it leave 6 s for the last 6 steps, not minutes."""
    from snuggle.train.metrics import ProgressBar, phase_notes

    bar = ProgressBar(10, 0, True)
    bar.phase("eval at step 0")
    assert bar.bar.desc.startswith("eval at step 0")
    bar.phase("train")
    bar.update(5.0, 1e-3, 100.0, 0.5, step_time_s=50.0)
    assert bar.eta_s() is None and "eta=?" in str(bar.bar)
    for _ in range(3):
        bar.update(5.0, 1e-3, 100.0, 0.5, step_time_s=1.0)
    assert bar.eta_s() == pytest.approx(6.0)
    assert "eta=0:06" in str(bar.bar)
    bar.close()
    off = ProgressBar(10, 0, False)  # no bar: the estimate is still kept, nothing printed
    off.update(5.0, 1e-3, 100.0, 0.5, step_time_s=9.0)
    off.update(5.0, 1e-3, 100.0, 0.5, step_time_s=2.0)
    assert off.eta_s() == pytest.approx(16.0)
    capsys.readouterr()
    # setup phases are named where a person watches (a terminal), and nowhere else
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    phase_notes(True)("loading the model m")
    phase_notes(False)("tokenizing")
    assert capsys.readouterr().err == "snuggle: loading the model m ...\n"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    phase_notes(True)("tokenizing")
    assert capsys.readouterr().err == ""


def test_loss_plot_smooths_marks_evaluations_and_names_the_run(tmp_path, corpus):
    import matplotlib.pyplot as plt

    from snuggle.train.metrics import loss_figure, plot_title, smoothed

    assert smoothed([2.0, 2.0, 2.0], 5) == pytest.approx([2.0, 2.0, 2.0])  # no pull toward 0
    wavy = [3.0 + (0.4 if i % 2 else -0.4) for i in range(100)]
    ema = smoothed(wavy, 10)
    assert max(ema[20:]) - min(ema[20:]) < 0.2  # the swing of +-0.4 mostly averaged out
    rows = [{"step": s, "loss": wavy[s - 1]} for s in range(1, 101)]
    rows += [{"step": s, "eval_loss": 3.0 - s / 100} for s in (0, 50, 100)]
    cfg = make_cfg(tmp_path / "SmolLM2-135M.gguf", corpus, tmp_path / "man-de", "train.steps=100")
    title = plot_title(cfg, 4)
    assert title.startswith("man-de: SmolLM2-135M.gguf, LoRA r=4") and "batch 4 x 16 tokens" in title
    fig = loss_figure(rows, title)
    try:
        ax = fig.axes[0]
        raw, trend, evals = ax.get_lines()
        assert raw.get_alpha() < 0.5 and len(raw.get_xdata()) == 100
        assert "EMA" in trend.get_label() and len(trend.get_xdata()) == 100
        assert evals.get_linestyle() == "None" and evals.get_marker() == "o"  # points, not a line
        assert list(evals.get_xdata()) == [0, 50, 100]
        assert ax.get_title() == title
    finally:
        plt.close(fig)


def test_the_end_of_a_run_says_what_its_directory_holds(tiny_hf_model, tmp_path, corpus, capsys):
    """A 135M LoRA run took 877 MB: the last line says what takes the room (the optimizer state, twice
    the trainables, read only to resume) and how to keep less."""
    from snuggle.train.checkpoint import run_room

    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    out = tmp_path / "run"
    train(make_cfg(model_dir, corpus, out, "train.save_every=1", "train.progress=true"))
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith(f"snuggle: {out}: "))
    assert "of it 2 checkpoints (train.keep_checkpoints)" in line and "train.keep_checkpoints=1" in line
    text = run_room(out)
    trainable = sum((c / "trainable.safetensors").stat().st_size for c in out.glob("checkpoint-*"))
    moments = sum(p.stat().st_size for p in out.glob("checkpoint-*/optimizer/*") if p.is_file())
    assert moments > 1.5 * trainable  # AdamW: two fp32 moments a trainable value
    assert f"trainable tensors {trainable / 1024:.1f} KiB" in text, text
    assert f"optimizer state {moments / 1024:.1f} KiB" in text, text
