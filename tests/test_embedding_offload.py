"""Trained embeddings whose optimizer state and fp32 master live in CPU memory (train.embedding_offload).

On CPU "host memory" is the same memory, but the path is the real one: a second optimizer over separate
fp32 masters, gradients copied off the model's parameters after clipping, the masters copied back. Its
curve must equal the all-on-device path's. Tolerance: the update rule and the order of every operation
are the same, so the losses agree to 1e-6 relative (float32 rounding of the copies, in practice exact).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from snuggle.config import LoraConfig
from snuggle.errors import SnuggleError
from snuggle.lora import apply_lora
from snuggle.train.checkpoint import latest_checkpoint
from snuggle.train.embedding_offload import HostOffloadOptimizer
from snuggle.train.loop import train
from snuggle.train.memory import GIB, plan_for_model, static_bytes
from test_train import (
    EMBEDDINGS,
    base_tensors,
    checkpoint_tensors,
    learnable_docs,
    make_cfg,
    read_metrics,
    replayable,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("single_thread")

RTOL = 1e-6


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", learnable_docs(40))


def _cpt(model_dir, corpus, out, *extra):
    return make_cfg(
        model_dir,
        corpus,
        out,
        "lora.train_embeddings=true",
        "train.embedding_lr=0.003",
        "train.weight_decay=0.01",
        "train.steps=4",
        "train.grad_accum=2",
        "train.warmup_steps=1",
        "train.schedule=linear",
        *extra,
    )


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
@pytest.mark.parametrize(("family", "tie"), [("llama", False), ("qwen2", True)], ids=["untied", "tied"])
def test_host_update_follows_the_on_device_curve(tiny_hf_model, tmp_path, corpus, family, tie, optimizer):
    model_dir, _ = tiny_hf_model(family, tie, tmp_path)
    runs = {}
    for place in ("gpu", "cpu"):
        out = tmp_path / place
        extra = (f"train.optimizer={optimizer}", f"train.embedding_offload={place}")
        train(_cpt(model_dir, corpus, out, *extra))
        runs[place] = (read_metrics(out), checkpoint_tensors(out))
    (rows_dev, w_dev), (rows_host, w_host) = runs["gpu"], runs["cpu"]
    losses_dev = [r["loss"] for r in rows_dev if "loss" in r]
    losses_host = [r["loss"] for r in rows_host if "loss" in r]
    assert len(losses_dev) == 4
    torch.testing.assert_close(torch.tensor(losses_host), torch.tensor(losses_dev), rtol=RTOL, atol=0)
    assert set(w_host) == set(w_dev)
    for name in w_dev:
        torch.testing.assert_close(w_host[name], w_dev[name], rtol=1e-5, atol=1e-7, msg=name)
    # the embeddings trained (on the host), not only the adapters
    base = base_tensors(model_dir)
    for name in EMBEDDINGS if not tie else EMBEDDINGS[:1]:
        assert not torch.equal(w_host[name], base[name]), name


def test_resume_with_host_state_replays_the_uninterrupted_run(tiny_hf_model, tmp_path, corpus):
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    extra = ("train.embedding_offload=cpu", "train.save_every=2")
    full = tmp_path / "full"
    train(_cpt(model_dir, corpus, full, *extra))
    ref_rows, ref = replayable(read_metrics(full)), checkpoint_tensors(full)

    rewound = tmp_path / "rewound"
    shutil.copytree(full, rewound)
    shutil.rmtree(rewound / "checkpoint-0000004")
    (rewound / "latest").write_text("checkpoint-0000002")
    train(_cpt(model_dir, corpus, rewound, *extra, "train.resume=true"))
    assert latest_checkpoint(rewound).name == "checkpoint-0000004"
    assert replayable(read_metrics(rewound)) == ref_rows
    for name, t in checkpoint_tensors(rewound).items():
        assert torch.equal(t, ref[name]), name


def test_host_offload_without_trained_embeddings_is_one_error(tiny_hf_model, tmp_path, corpus):
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    cfg = make_cfg(model_dir, corpus, tmp_path / "o", "train.embedding_offload=cpu")
    with pytest.raises(SnuggleError, match="no embeddings train"):
        train(cfg)


def test_optimizer_state_of_the_embeddings_is_on_the_host_side(tiny_hf_model, tmp_path):
    from snuggle.config import TrainConfig
    from snuggle.load import load
    from snuggle.train.optim import build_optimizer

    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    model = apply_lora(
        load(model_dir, dtype=torch.float32)[0], LoraConfig(r=2, alpha=4, train_embeddings=True)
    )
    opt = build_optimizer(model, TrainConfig(embedding_lr=1e-3), host_embeddings=True)
    assert isinstance(opt, HostOffloadOptimizer)
    emb = model.model.embed_tokens.weight
    assert [g["name"] for g in opt.param_groups][-1] == "embeddings"
    # the device optimizer never sees the embeddings; the host one sees their masters, not them
    dev_params = {id(p) for g in opt.device_opt.param_groups for p in g["params"]}
    host_params = [p for g in opt.host_opt.param_groups for p in g["params"]]
    assert id(emb) not in dev_params and all(p is not emb for p in host_params)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    opt.step()
    assert set(opt.state[emb]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[emb]["exp_avg"] is opt.host_opt.state[host_params[0]]["exp_avg"]
    assert emb.grad is not None
    opt.zero_grad()
    assert emb.grad is None


def test_plan_counts_host_state_and_moves_it_when_nothing_fits_on_the_device(tiny_hf_model, tmp_path):
    from snuggle.load import load

    model_dir, _ = tiny_hf_model("llama", False, tmp_path, vocab_size=4001)
    model = apply_lora(
        load(model_dir, dtype=torch.float32)[0], LoraConfig(r=2, alpha=4, train_embeddings=True)
    )
    emb_ids = frozenset(id(w) for w in (model.model.embed_tokens.weight, model.lm_head.weight))
    on_dev, on_host = static_bytes(model), static_bytes(model, host_state=emb_ids)
    # AdamW's two fp32 moments of both copies leave the device
    assert on_dev - on_host == 8 * 2 * 4001 * 48
    gpu = plan_for_model(model, 1, 16, 64.0, can_offload=False, embedding_offload="gpu")
    host = plan_for_model(model, 1, 16, 64.0, can_offload=False, embedding_offload="cpu")
    assert gpu.embeddings == "gpu" and host.embeddings == "cpu"
    assert "optimizer state on the GPU" in gpu.describe()
    assert "optimizer state and fp32 master in CPU memory" in host.describe()
    # a budget between the two predictions: auto keeps the state on the device only while it fits
    tight = (gpu.predicted_gib + host.predicted_gib) / 2
    for budget, place in ((64.0, "gpu"), (tight, "cpu")):
        plan = plan_for_model(model, 1, 16, budget, can_offload=False, embedding_offload="auto")
        assert plan.embeddings == place
    with pytest.raises(SnuggleError):
        plan_for_model(model, 1, 16, tight, can_offload=False, embedding_offload="gpu")
    assert host.predicted_gib < gpu.predicted_gib and on_host / GIB < host.predicted_gib


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_update_on_a_gpu_follows_the_on_device_curve(tiny_hf_model, tmp_path, corpus):
    # fp32 so that the tolerance is the optimizers' (fused on the GPU, foreach on the host), not bf16's
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    losses = {}
    for place in ("gpu", "cpu"):
        out = tmp_path / place
        extra = ("model.device=cuda", "model.dtype=float32", f"train.embedding_offload={place}")
        train(_cpt(model_dir, corpus, out, *extra))
        losses[place] = [r["loss"] for r in read_metrics(out) if "loss" in r]
    torch.testing.assert_close(torch.tensor(losses["cpu"]), torch.tensor(losses["gpu"]), rtol=1e-5, atol=0)
