"""A second stage: `data.format: instruct` in the trainer, and `model.adapter` starting a run from the LoRA
factors (and trained embeddings) of a CPT run or of a PEFT adapter, with a fresh optimizer from step 0.

One module-scoped CPT run (a few steps of a tiny model) is the starting point of every test here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import snuggle.api as api_mod
from conftest import build_tiny_hf_model
from snuggle.cli import main
from snuggle.config import load_config, to_dict
from snuggle.data.instruct import FALLBACK_TEMPLATE, PackedExamples, tokenize_instruct
from snuggle.data.packing import IGNORE_INDEX
from snuggle.errors import SnuggleError
from snuggle.io.peft_format import save_peft_adapter
from snuggle.lora import trainable_state
from snuggle.rebuild import load_run
from snuggle.train.checkpoint import latest_checkpoint
from snuggle.train.loop import train
from snuggle.train.setup import build_data, build_model
from test_train import checkpoint_tensors, learnable_docs, read_metrics, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")

RECORDS = [
    {"instruction": "name a bird", "output": "the blue bird sings."},
    {"instruction": "name a cat", "input": "a big one", "output": "the big cat sleeps."},
    {
        "messages": [
            {"role": "user", "content": "a dog?"},
            {"role": "assistant", "content": "a red dog runs."},
        ]
    },
]
INSTRUCT = ["data.format=instruct", "data.seq_len=64"]  # rows that hold whole examples of RECORDS
# the CPT run's LoRA; a stage that continues it must say the same
LORA = ["lora.r=4", "lora.alpha=8", "lora.rslora=true", "lora.train_embeddings=true"]


@pytest.fixture(scope="module")
def cpt(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see conftest.single_thread; a module fixture cannot use that fixture
    try:
        base = root / "base"
        build_tiny_hf_model("llama", False, base)
        corpus = write_jsonl(root / "corpus.jsonl", learnable_docs(40))
        instruct = root / "instruct.jsonl"
        instruct.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 8))
        run = root / "cpt"
        train(stage_cfg(root, base, corpus, run, "train.steps=3"))
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "base": base, "corpus": corpus, "instruct": instruct, "run": run}


def stage_cfg(root: Path, base: Path, data: Path, out: Path, *overrides: str):
    return load_config(
        None,
        [
            f"model.path={base}",
            f"data.train={data}",
            f"data.cache_dir={root / 'token-cache'}",
            "data.seq_len=32",
            "data.val_fraction=0.2",
            *LORA,
            "train.steps=2",
            "train.batch_size=2",
            "train.lr=0.01",
            "train.progress=false",
            f"train.output_dir={out}",
            *overrides,
        ],
    )


# --- data.format: instruct ------------------------------------------------------------------------------

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def test_instruct_format_builds_packed_examples_and_trains(cpt, tmp_path):
    out = tmp_path / "sft"
    cfg = stage_cfg(cpt["root"], cpt["base"], cpt["instruct"], out, *INSTRUCT)
    model, tok = build_model(cfg)
    data = build_data(cfg.data, tok, cfg.train.seed, model.args.max_position_embeddings)
    assert isinstance(data.rows, PackedExamples)
    # the rows are tokenize_instruct + PackedExamples, split like any rows
    ref = PackedExamples(tokenize_instruct([cpt["instruct"]], tok, cache_dir=tmp_path / "c"), 64)
    assert len(data.rows) == len(ref) == len(data.train_idx) + len(data.val_idx)
    for i in (0, len(ref) - 1):
        for key, t in ref[i].items():
            assert torch.equal(data.rows[i][key], t), key
    # only replies are targets: far fewer than the tokens
    labels = torch.stack([data.rows[i]["labels"] for i in range(len(ref))])
    assert 0 < int((labels != IGNORE_INDEX).sum()) < labels.numel() // 2

    summary = train(cfg)
    assert summary["eval_loss"] < summary["eval_loss_before"]
    assert {r["step"] for r in read_metrics(out) if "eval_loss" in r} == {0, 2}
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["format"] == "instruct"
    # `generate --adapter` on this run chats with the template it trained with (here the fallback,
    # as the tokenizer has none), while the CPT run's adapter leaves prompts raw
    assert api_mod._chat_template(tok, str(out), explicit=False) == FALLBACK_TEMPLATE
    assert api_mod._chat_template(tok, str(cpt["run"]), explicit=False) is None


def test_instruct_chat_template_override(cpt, tmp_path):
    cfg = stage_cfg(cpt["root"], cpt["base"], cpt["instruct"], tmp_path / "o", *INSTRUCT)
    cfg.data.chat_template = CHATML
    model, tok = build_model(cfg)
    data = build_data(cfg.data, tok, cfg.train.seed, model.args.max_position_embeddings)
    stream = tokenize_instruct([cpt["instruct"]], tok, cache_dir=tmp_path / "c", chat_template=CHATML)
    assert torch.equal(data.rows[0]["input_ids"], PackedExamples(stream, 64)[0]["input_ids"])
    fallback = build_data(
        stage_cfg(cpt["root"], cpt["base"], cpt["instruct"], tmp_path / "o", *INSTRUCT).data,
        tok,
        cfg.train.seed,
        256,
    )
    assert not torch.equal(data.rows[0]["input_ids"], fallback.rows[0]["input_ids"])
    # a run trained with the override: `generate --adapter RUN` renders prompts with it too
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    assert api_mod._chat_template(tok, str(run), explicit=False) == CHATML


def test_instruct_config_errors(cpt, tmp_path):
    with pytest.raises(SnuggleError, match="data.chat_template applies to data.format=instruct"):
        stage_cfg(cpt["root"], cpt["base"], cpt["corpus"], tmp_path, "data.chat_template=x")
    with pytest.raises(SnuggleError, match="data.format' must be 'text' | 'instruct'"):
        stage_cfg(cpt["root"], cpt["base"], cpt["corpus"], tmp_path, "data.format=chat")
    # plain text documents are not instruction records: the record error names file and line
    cfg = stage_cfg(cpt["root"], cpt["base"], cpt["corpus"], tmp_path / "o", *INSTRUCT)
    with pytest.raises(SnuggleError, match=r"corpus.jsonl:1: expected 'messages' or 'instruction'"):
        train(cfg)
    assert not (tmp_path / "o").exists()


# --- model.adapter: a snuggle run -------------------------------------------------------------------------


def test_continue_from_run_starts_from_its_trainables(cpt, tmp_path):
    saved = checkpoint_tensors(cpt["run"])
    out = tmp_path / "stage2"
    # same data and seed as the CPT run: its held-out rows are this run's, so step 0 must score exactly
    # what the CPT run scored at its end
    cfg = stage_cfg(cpt["root"], cpt["base"], cpt["corpus"], out, f"model.adapter={cpt['run']}")
    torch.manual_seed(cfg.train.seed)
    model, _ = build_model(cfg)
    live = trainable_state(model)
    assert set(live) == set(saved)
    for name, t in saved.items():
        assert torch.equal(live[name].detach(), t), name

    summary = train(cfg)
    cpt_evals = [r for r in read_metrics(cpt["run"]) if "eval_loss" in r]
    assert summary["eval_loss_before"] == pytest.approx(cpt_evals[-1]["eval_loss"], rel=1e-6)
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # the step counter starts at 0
    ckpt = latest_checkpoint(out)
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 2
    # a fresh schedule (and optimizer): this stage's 2 steps, not the CPT run's 3 + 2
    sched = torch.load(ckpt / "state.pt", weights_only=True)["scheduler"]
    assert sched["last_epoch"] == 2

    # the second stage's own checkpoint holds every trainable: it loads without the first run
    moved = tmp_path / "cpt-copy"
    shutil.copytree(cpt["run"], moved)
    out2 = tmp_path / "stage2-of-copy"
    train(stage_cfg(cpt["root"], cpt["base"], cpt["corpus"], out2, f"model.adapter={moved}", "train.steps=1"))
    shutil.rmtree(moved)
    model2, _, cfg2 = load_run(out2)
    assert cfg2.model.adapter == str(moved)
    for name, t in checkpoint_tensors(out2).items():
        assert torch.equal(dict(model2.named_parameters())[name].detach(), t), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.r=8"], r"lora settings differ from model.adapter .*: lora.r=8 \(adapter: 4\)"),
        (
            ["lora.train_embeddings=false", "lora.alpha=4"],
            r"lora.alpha=4.0 \(adapter: 8.0\), lora.train_embeddings=False \(adapter: True\)",
        ),
        (["lora.targets=[q_proj,v_proj]"], r"lora.targets=\['q_proj', 'v_proj'\] \(adapter: \['q_proj'"),
    ],
    ids=["rank", "alpha-embeddings", "targets"],
)
def test_mismatched_lora_config_is_an_error(cpt, tmp_path, capfd, overrides, message):
    out = tmp_path / "o"
    cfg = stage_cfg(cpt["root"], cpt["base"], cpt["corpus"], out, f"model.adapter={cpt['run']}", *overrides)
    with pytest.raises(SnuggleError, match=message):
        build_model(cfg)
    # through the CLI: one line, nothing written
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["train", str(config)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("snuggle: error: lora settings differ"), err
    assert not out.exists()


def test_adapter_must_belong_to_model_path(cpt, tmp_path):
    # another base model: the shapes tell, and the error names both models
    other = tmp_path / "other-base"
    build_tiny_hf_model("llama", False, other, seed=1, hidden_size=32, intermediate_size=64)
    cfg = stage_cfg(cpt["root"], other, cpt["corpus"], tmp_path / "o", f"model.adapter={cpt['run']}")
    with pytest.raises(
        SnuggleError,
        match=rf"model.adapter {cpt['run']} was trained on a different base model: .*hidden 48.*"
        r"this model has hidden 32",
    ):
        build_model(cfg)
    # the same shapes under another path (a copy, another machine): a warning, not an error
    same = tmp_path / "same-shapes"
    build_tiny_hf_model("llama", False, same, seed=1)
    cfg = stage_cfg(cpt["root"], same, cpt["corpus"], tmp_path / "o", f"model.adapter={cpt['run']}")
    with pytest.warns(
        UserWarning, match=rf"model.adapter {cpt['run']} was trained on .*base, not on model.path"
    ):
        build_model(cfg)
    with pytest.raises(SnuggleError, match="model.adapter needs LoRA"):
        stage_cfg(
            cpt["root"], cpt["base"], cpt["corpus"], tmp_path, f"model.adapter={cpt['run']}", "lora=null"
        )
    missing = stage_cfg(
        cpt["root"], cpt["base"], cpt["corpus"], tmp_path, f"model.adapter={tmp_path / 'nope'}"
    )
    with pytest.raises(SnuggleError, match="model.adapter not found"):
        build_model(missing)
    (tmp_path / "empty").mkdir()
    neither = stage_cfg(
        cpt["root"], cpt["base"], cpt["corpus"], tmp_path, f"model.adapter={tmp_path / 'empty'}"
    )
    with pytest.raises(SnuggleError, match="not a snuggle run directory .* nor a PEFT adapter"):
        build_model(neither)


# --- model.adapter: a PEFT adapter ------------------------------------------------------------------------


def test_start_from_peft_adapter(cpt, tmp_path):
    run_model, _, run_cfg = load_run(cpt["run"])
    adapter = tmp_path / "adapter"
    save_peft_adapter(run_model, run_cfg.lora, str(cpt["base"].resolve()), adapter)
    cfg = stage_cfg(
        cpt["root"],
        cpt["base"],
        cpt["instruct"],
        tmp_path / "o",
        f"model.adapter={adapter}",
        *INSTRUCT,
    )
    cfg.lora.dropout = 0.1
    model, _ = build_model(cfg)
    live, want = trainable_state(model), trainable_state(run_model)
    assert set(live) == set(want)
    for name, t in want.items():
        assert torch.equal(live[name].detach(), t.detach()), name
    assert all(p.dtype == torch.float32 for p in live.values())
    assert model.model.layers[0].self_attn.q_proj.dropout.p == 0.1  # the config's dropout, not the adapter's
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["eval_loss"] < summary["eval_loss_before"]

    # an adapter recording another base path is used with a warning (paths differ between machines;
    # its shapes are what prove a different base, tests/test_mismatch.py) ...
    wrong = tmp_path / "wrong"
    save_peft_adapter(run_model, run_cfg.lora, str(cpt["corpus"]), wrong)
    bad = stage_cfg(cpt["root"], cpt["base"], cpt["corpus"], tmp_path / "o2", f"model.adapter={wrong}")
    with pytest.warns(UserWarning, match="was trained on .*corpus.jsonl, not on model.path"):
        build_model(bad)
    # ... and a differing LoRA shape by its config
    bad = stage_cfg(
        cpt["root"], cpt["base"], cpt["corpus"], tmp_path / "o2", f"model.adapter={adapter}", "lora.r=2"
    )
    with pytest.raises(SnuggleError, match=r"lora.r=2 \(adapter: 4\)"):
        build_model(bad)
