"""snuggle.api: train, evaluate, generate and export from Python with the command line's config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import build_tiny_hf_model
from snuggle import api
from snuggle.config import load_config, make_config
from snuggle.errors import SnuggleError
from snuggle.load import load

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # transformers deprecations raised inside peft
]
WORDS = "the a cat dog bird fish sees eats red big small old".split()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api")
    build_tiny_hf_model("llama", False, root / "base")
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 25)))) + "." for _ in range(40)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {"root": root, "model": root / "base", "corpus": corpus}


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SNUGGLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def config(base: dict[str, Path]) -> dict:
    return {
        "model": {"path": str(base["model"])},
        "lora": {"r": 4, "alpha": 8, "rslora": True, "train_embeddings": True},
        "data": {"train": str(base["corpus"]), "seq_len": 16, "val_fraction": 0.2},
        "train": {"steps": 1, "batch_size": 2, "lr": 0.01, "progress": False},
    }


def test_overrides_reach_the_config_from_every_source(base, tmp_path):
    tree = config(base)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    typed = {"train.steps": 7, "lora.targets": ["q_proj", "v_proj"], "train.output_dir": "o"}
    from_dict = make_config(tree, typed)
    assert make_config(path, typed) == from_dict == make_config(make_config(tree), typed)
    assert from_dict.train.steps == 7 and from_dict.lora.targets == ["q_proj", "v_proj"]
    assert tree["train"]["steps"] == 1  # the caller's dict is not modified
    # the command line's strings, read as YAML, give the same config as the typed values
    assert make_config(path, ["train.steps=7", "lora.targets=[q_proj, v_proj]", "train.output_dir=o"]) == (
        from_dict
    )
    assert load_config(path, ["train.steps=7"]).train.steps == 7


@pytest.mark.parametrize(
    ("source", "overrides", "fragment"),
    [
        ({"train": {"steps": 1}}, {}, "model.path is required"),
        ({}, {"train.stepz": 3, "model.path": "m", "data.train": "d"}, "stepz"),
        ({}, {"": 3}, "must look like section.key"),
        ({}, ["train.steps"], "must look like section.key=value"),
        (42, {}, "a RunConfig, a mapping or a YAML path"),
    ],
)
def test_bad_configs_raise_one_line(source, overrides, fragment):
    with pytest.raises(SnuggleError) as e:
        make_config(source, overrides)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_train_evaluate_generate_export_from_python(base, tmp_path):
    out = tmp_path / "run"
    summary = api.train(config(base), {"train.steps": 3, "train.output_dir": str(out)})
    assert summary["steps"] == 3 and summary["output_dir"] == str(out)
    assert math.isfinite(summary["final_loss"]) and summary["eval_loss"] < summary["eval_loss_before"]
    assert (out / "latest").is_file()

    # the adapter's held-out loss is the one training reported
    kw = {"seq_len": 16, "cache_dir": tmp_path / "eval-cache"}
    before = api.evaluate(base["model"], base["corpus"], **kw)
    after = api.evaluate(base["model"], base["corpus"], adapter=out, **kw)
    assert after["format"] == "text" and after["tokens"] == before["tokens"] > 0
    assert after["loss"] < before["loss"]
    assert math.isclose(after["perplexity"], math.exp(after["loss"]), rel_tol=1e-6)

    pieces: list[str] = []
    text = api.generate(base["model"], "the cat", adapter=out, max_new_tokens=5, on_text=pieces.append)
    assert text == "".join(pieces)
    assert api.generate(base["model"], "the cat", adapter=out, max_new_tokens=5) == text  # greedy: same
    echoed: list[str] = []
    api.generate(base["model"], "the cat", adapter=out, max_new_tokens=5, on_text=echoed.append, echo=True)
    assert echoed[0] == "the cat" and "".join(echoed[1:]) == text

    merged = tmp_path / "merged"
    assert api.export(out, merged) == {"format": "hf", "out": str(merged)}
    assert api.export(out, tmp_path / "m.gguf", format="gguf", dtype="f32")["dtype"] == "f32"
    assert api.export(out, tmp_path / "peft", format="peft")["format"] == "peft"
    # the merged model is the adapted one: the same greedy continuation and held-out loss
    assert api.generate(merged, "the cat", max_new_tokens=5) == text
    assert math.isclose(api.evaluate(merged, base["corpus"], **kw)["loss"], after["loss"], rel_tol=1e-4)
    model, tok = load(str(tmp_path / "m.gguf"))
    ids = tok("the cat", return_tensors="pt").input_ids  # (1, T)
    assert torch.isfinite(model(ids)).all()


def test_api_refusals_are_one_line(base, tmp_path):
    for call, fragment in (
        (lambda: api.evaluate(base["model"], base["corpus"], seq_len=1), "--seq-len must be >= 2"),
        (lambda: api.evaluate(base["model"], base["corpus"], format="csv"), "--format is text or instruct"),
        (lambda: api.generate(base["model"], "the", top_p=0.0), "--top-p must be in (0, 1]"),
        (lambda: api.export(tmp_path, tmp_path / "x", format="onnx"), "--format is hf, peft or gguf"),
        (lambda: api.export(tmp_path, tmp_path / "x.gguf", format="gguf", dtype="q3"), "gguf writes"),
    ):
        with pytest.raises(SnuggleError) as e:
            call()
        assert fragment in str(e.value) and "\n" not in str(e.value)


def test_the_progress_bar_is_tqdm_auto_so_a_notebook_gets_its_widget(capsys):
    # tqdm.auto is tqdm.notebook's widget under a Jupyter kernel with ipywidgets, the text bar elsewhere
    from tqdm.auto import tqdm as auto_tqdm

    from snuggle.train.metrics import ProgressBar

    bar = ProgressBar(total=2, initial=0, enabled=True)
    assert isinstance(bar.bar, auto_tqdm)
    bar.update(loss=1.0, lr=1e-3, tokens_per_s=10.0, mem_gib=0.1)
    bar.close()
    assert "loss=1.0000" in capsys.readouterr().err
