"""`train.report_to`: TensorBoard and W&B (offline) get the rows of metrics.jsonl; bad names and missing
packages are one-line config errors before anything is written."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

import snuggle.train.reporters as reporters_mod
from snuggle.config import load_config
from snuggle.errors import SnuggleError
from snuggle.train.loop import train
from test_train import learnable_docs, make_cfg, read_metrics, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def run_setup(tiny_hf_model, tmp_path) -> tuple[Path, Path]:
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    return model_dir, write_jsonl(tmp_path / "corpus.jsonl", learnable_docs(40))


def test_tensorboard_gets_the_metrics_rows(run_setup, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model_dir, corpus = run_setup
    out = tmp_path / "run"
    train(make_cfg(model_dir, corpus, out, "train.report_to=[tensorboard]", "data.val_fraction=0.2"))
    (events,) = (out / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in train_rows] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train_rows], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/loss")] == [0, 3]
    assert [e.value for e in acc.Scalars("eval/loss")] == pytest.approx([r["eval_loss"] for r in eval_rows])
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "eval/ppl"} <= set(acc.Tags()["scalars"])


def test_wandb_offline_run_writes_its_files(run_setup, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    wandb_dir = tmp_path / "wandb-dir"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    model_dir, corpus = run_setup
    out = tmp_path / "run"
    train(make_cfg(model_dir, corpus, out, "train.report_to=wandb", "train.wandb_project=snuggle-test"))
    run_id = (out / "wandb" / "run-id").read_text()
    (run_dir,) = (wandb_dir / "wandb").glob(f"offline-run-*-{run_id}")
    keys = (b"train/loss", b"train/lr", b"snuggle-test")
    # the records `wandb sync` would upload. wandb's own service process writes this file; once on a
    # loaded 2-core CI machine it held only its header when read right after `finish()` returned, so
    # give that process a bounded while to write what it was handed
    deadline = time.monotonic() + 30
    data = (run_dir / f"run-{run_id}.wandb").read_bytes()
    while not all(k in data for k in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
        data = (run_dir / f"run-{run_id}.wandb").read_bytes()
    for key in keys:
        assert key in data, key


def test_unknown_reporter_is_a_config_error(tmp_path):
    with pytest.raises(
        SnuggleError, match="train.report_to: unknown reporter 'mlflow'; known: tensorboard, wandb"
    ):
        load_config(None, ["model.path=m", "data.train=d", "train.report_to=[tensorboard, mlflow]"])
    with pytest.raises(SnuggleError, match="names a reporter twice"):
        load_config(None, ["model.path=m", "data.train=d", "train.report_to=[wandb, wandb]"])


def test_missing_package_fails_before_writing(run_setup, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        reporters_mod.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else real(name, *a),
    )
    model_dir, corpus = run_setup
    out = tmp_path / "run"
    with pytest.raises(
        SnuggleError, match="train.report_to: wandb needs the 'wandb' package: pip install wandb"
    ):
        train(make_cfg(model_dir, corpus, out, "train.report_to=[wandb]"))
    assert not out.exists()
