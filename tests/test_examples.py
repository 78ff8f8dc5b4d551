"""The example configs load and validate, and the real-sized ones carry the CPT recipe they promise."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from snuggle.config import RunConfig, load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RECIPE = ("cpt_7b_24gb.yaml", "cpt_7b_2gpu.yaml", "cpt_recipe_cpu.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_config_loads_and_validates(name):
    assert isinstance(load_config(EXAMPLES / name), RunConfig)


@pytest.mark.parametrize("name", RECIPE)
def test_recipe_configs_carry_the_cpt_recipe(name):
    # Unsloth's CPT notebook: 4-bit base, rsLoRA r=128 alpha 32 dropout 0 on every projection, full
    # trainable embed_tokens / lm_head at lr 5e-5 / 1e-5, 8-bit AdamW, wd 0.01, linear, warmup 10
    cfg = load_config(EXAMPLES / name)
    assert cfg.model.quantize == "nf4"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.rslora, cfg.lora.dropout) == (128, 32, True, 0.0)
    assert cfg.lora.targets == "all-linear" and cfg.lora.train_embeddings
    t = cfg.train
    assert (t.lr, t.embedding_lr, t.weight_decay) == (5e-5, 1e-5, 0.01)
    assert (t.schedule, t.warmup_steps) == ("linear", 10)
    # 8-bit AdamW on the GPU configs; the CPU one keeps fp32 AdamW (the 8-bit coding is slow on a CPU)
    assert t.optimizer == ("adamw" if name == "cpt_recipe_cpu.yaml" else "adamw8bit")


def test_the_7b_configs_are_the_notebooks_shape_on_one_card_and_two():
    one, two = load_config(EXAMPLES / "cpt_7b_24gb.yaml"), load_config(EXAMPLES / "cpt_7b_2gpu.yaml")
    assert one.model.dtype == "bfloat16" and one.data.seq_len == 2048
    assert (one.train.batch_size, one.train.grad_accum) == (2, 8)
    # the same global batch, so the same curve (the loss is normalised over the whole global step)
    assert two.train.batch_size * two.train.grad_accum * 2 == one.train.batch_size * one.train.grad_accum
    assert two.train.parallel in ("auto", "ddp")

    def rest(cfg: RunConfig) -> RunConfig:  # everything but what the world size changes
        t = dataclasses.replace(cfg.train, grad_accum=0, parallel="auto", output_dir="")
        return dataclasses.replace(cfg, train=t)

    assert rest(one) == rest(two)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_the_cpu_recipe_trains_on_a_tiny_model(tmp_path, optimizer):
    # the recipe's own settings (4-bit base, rsLoRA r=128, trained embeddings at their own lr, linear
    # schedule); only the model, the data and the sizes are swapped for a tiny model's
    import json

    from conftest import build_tiny_hf_model
    from snuggle import api

    build_tiny_hf_model("llama", False, tmp_path / "base")
    words = "the a cat dog bird fish sees eats red big small old".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(3 + i % 9)) + "." for i in range(40)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    overrides = {
        "model.path": str(tmp_path / "base"),
        "data.train": str(tmp_path / "c.jsonl"),
        "data.cache_dir": str(tmp_path / "cache"),
        "data.seq_len": 16,
        "data.val_fraction": 0.2,
        "train.steps": 3,
        "train.warmup_steps": 1,
        "train.optimizer": optimizer,
        "train.output_dir": str(tmp_path / "run"),
        "train.progress": False,
    }
    summary = api.train(EXAMPLES / "cpt_recipe_cpu.yaml", overrides)
    assert summary["steps"] == 3 and all(math.isfinite(summary[k]) for k in ("final_loss", "eval_loss"))
