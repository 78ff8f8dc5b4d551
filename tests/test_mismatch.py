"""Mismatches named, not crashed into: tokenizer vs model vocabulary, stale token caches, adapters of another
base model (by shape, whatever the recorded base name says; a differing name alone only warns)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tiny_hf_model
from snuggle.cli import main
from snuggle.config import LoraConfig, load_config
from snuggle.data.tokenize import META_FILE, TOKENS_FILE
from snuggle.errors import SnuggleError
from snuggle.io.peft_format import load_peft_adapter, save_peft_adapter
from snuggle.load import load
from snuggle.lora import LoRALinear, apply_lora
from snuggle.rebuild import load_with_adapter
from snuggle.train.setup import build_data, build_model
from test_train import learnable_docs, make_cfg, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")

TOKENIZER_IDS = 97  # conftest.build_tiny_tokenizer: ids 0..96; the tiny models have 101 embedding rows


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Tiny base models: `a` (hidden 48, 2 layers), `a_copy` (a's shapes, other weights, other path),
    `narrow` (hidden 32), `deep` (4 layers), `small_vocab` (64 rows, fewer than the tokenizer's ids)."""
    root = tmp_path_factory.mktemp("bases")
    specs = {
        "a": {},
        "a_copy": {"seed": 1},
        "narrow": {"hidden_size": 32, "intermediate_size": 64},
        "deep": {"num_hidden_layers": 4},
        "small_vocab": {"vocab_size": 64},
    }
    out = {}
    for name, kw in specs.items():
        build_tiny_hf_model("llama", False, root / name, **kw)
        out[name] = root / name
    out["corpus"] = write_jsonl(root / "corpus.jsonl", learnable_docs(30))
    return out


def peft_adapter(base: Path, out: Path, train_embeddings: bool = False) -> Path:
    """A PEFT adapter of `base` with non-zero factors (so that loading it changes the model)."""
    model, _ = load(base, dtype=torch.float32, device="cpu", with_tokenizer=False)
    cfg = LoraConfig(r=4, alpha=8.0, train_embeddings=train_embeddings)
    apply_lora(model, cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0.0, 0.1)
    save_peft_adapter(model, cfg, str(base), out)
    return out


def fresh(base: Path):
    return load(base, dtype=torch.float32, device="cpu", with_tokenizer=False)[0]


# --- tokenizer vs model vocabulary ------------------------------------------------------------------------


def test_tokenizer_larger_than_the_embedding_is_refused(bases, tmp_path, capfd):
    cfg = make_cfg(bases["small_vocab"], bases["corpus"], tmp_path / "run")
    with pytest.raises(SnuggleError) as e:
        build_model(cfg)
    msg = str(e.value)
    assert f"the tokenizer has {TOKENIZER_IDS} token ids but the model's embedding has 64 rows" in msg, msg
    assert str(bases["small_vocab"]) in msg
    # eval / generate load through load_with_adapter: the same check, one line on the CLI
    args = ["eval", "--model", str(bases["small_vocab"]), "--data", str(bases["corpus"]), "--seq-len", "16"]
    assert main(args) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "64 rows" in err[0] and f"{TOKENIZER_IDS} token ids" in err[0], err
    # a tokenizer smaller than the embedding (a padded vocabulary) is fine: 97 ids, 101 rows
    build_model(make_cfg(bases["a"], bases["corpus"], tmp_path / "ok"))


def _cache_dir(cfg) -> Path:
    (meta,) = Path(cfg.data.cache_dir).glob(f"*/{META_FILE}")
    return meta.parent


def test_stale_token_cache_is_detected(bases, tmp_path):
    cfg = make_cfg(bases["a"], bases["corpus"], tmp_path / "run")
    model, tok = build_model(cfg)
    data = build_data(cfg.data, tok, 0, 256, vocab_size=model.args.vocab_size)
    assert data.rows.stream.max_token_id() < TOKENIZER_IDS
    cache = _cache_dir(cfg)
    meta = json.loads((cache / META_FILE).read_text())
    assert meta["max_id"] == data.rows.stream.max_token_id()  # recorded when the cache was written

    # a cache another (larger) tokenizer wrote under this key: ids the tokenizer cannot produce
    tokens = np.fromfile(cache / TOKENS_FILE, dtype="<u4")
    tokens[5] = 500
    tokens.tofile(cache / TOKENS_FILE)
    (cache / META_FILE).write_text(json.dumps({**meta, "max_id": 500}))
    with pytest.raises(SnuggleError, match=r"holds token id 500, but the tokenizer has only 97 ids"):
        build_data(cfg.data, tok, 0, 256)
    # a cache written before max_id was recorded: scanned, the same verdict
    del meta["max_id"]
    (cache / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(SnuggleError, match=r"holds token id 500, but the tokenizer has only 97 ids"):
        build_data(cfg.data, tok, 0, 256)
    # within the tokenizer, beyond a (hypothetically smaller) model: named as the model's vocabulary
    tokens[5] = 90
    tokens.tofile(cache / TOKENS_FILE)
    with pytest.raises(SnuggleError, match=r"holds token id 9\d, but the model's vocabulary has only 50 ids"):
        build_data(cfg.data, tok, 0, 256, vocab_size=50)


def test_stale_instruction_cache_is_detected(bases, tmp_path):
    records = tmp_path / "sft.jsonl"
    records.write_text(
        "".join(json.dumps({"instruction": "the cat", "output": f"a dog {i}"}) + "\n" for i in range(8))
    )
    cfg = make_cfg(bases["a"], records, tmp_path / "run", "data.format=instruct", "data.seq_len=64")
    _, tok = build_model(cfg)
    build_data(cfg.data, tok, 0, 256)
    cache = _cache_dir(cfg)
    tokens = np.fromfile(cache / TOKENS_FILE, dtype="<u4")
    tokens[1] = 1000
    tokens.tofile(cache / TOKENS_FILE)
    meta = json.loads((cache / META_FILE).read_text())
    del meta["max_id"]
    (cache / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(SnuggleError, match="holds token id 1000, but the tokenizer has only 97 ids"):
        build_data(cfg.data, tok, 0, 256)


# --- an adapter on a different base model -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("other", "theirs", "ours"),
    [
        ("narrow", "hidden 48, 2 layers", "hidden 32, 2 layers"),
        ("deep", "hidden 48, 2 layers", "hidden 48, 4 layers"),  # fewer layers than the model: not all of it
    ],
)
def test_peft_adapter_of_another_base_is_named(bases, tmp_path, other, theirs, ours):
    adapter = peft_adapter(bases["a"], tmp_path / "ad")
    model = fresh(bases[other])
    with pytest.raises(SnuggleError) as e:
        load_peft_adapter(model, adapter)
    msg = str(e.value)
    assert f"adapter {adapter} was trained on a different base model: a model with {theirs}" in msg, msg
    assert f"this model has {ours}" in msg, msg
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # left as it was


def test_adapter_with_more_layers_and_embeddings_is_named(bases, tmp_path):
    adapter = peft_adapter(bases["deep"], tmp_path / "ad", train_embeddings=True)
    with pytest.raises(
        SnuggleError,
        match=r"a model with hidden 48, 4 layers, vocabulary 101; this model has "
        r"hidden 48, 2 layers, vocabulary 101",
    ):
        load_peft_adapter(fresh(bases["a"]), adapter)


def test_layer_selection_is_not_a_mismatch(bases, tmp_path):
    """A PEFT adapter that says it covers some layers only (layers_to_transform) loads onto a deeper model;
    the layers it skipped stay exact no-ops."""
    adapter = peft_adapter(bases["a"], tmp_path / "ad")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "layers_to_transform": [0, 1]}))
    model = load_peft_adapter(fresh(bases["deep"]), adapter)
    assert torch.count_nonzero(model.model.layers[3].self_attn.q_proj.lora_B) == 0


def test_shapes_are_checked_even_when_the_names_match(bases, tmp_path):
    """The adapter records the very path it is loaded on, but the model there was replaced."""
    base = tmp_path / "replaced"
    shutil.copytree(bases["a"], base)
    adapter = peft_adapter(base, tmp_path / "ad")
    shutil.rmtree(base)
    build_tiny_hf_model("llama", False, base, hidden_size=32, intermediate_size=64)
    with pytest.raises(
        SnuggleError, match="a model with hidden 48, 2 layers; this model has hidden 32, 2 layers"
    ):
        load_with_adapter(str(base), str(adapter), dtype="float32", device="cpu")


def test_a_differing_base_name_alone_is_a_warning(bases, tmp_path):
    adapter = peft_adapter(bases["a"], tmp_path / "ad")
    with pytest.warns(UserWarning, match=f"adapter {adapter} was trained on {bases['a']}, not on --model"):
        model, _ = load_with_adapter(str(bases["a_copy"]), str(adapter), dtype="float32", device="cpu")
    assert any(isinstance(m, LoRALinear) for m in model.modules())


def test_run_adapter_on_another_base(bases, tmp_path, capfd):
    from snuggle.train.loop import train

    run = tmp_path / "run"
    train(make_cfg(bases["a"], bases["corpus"], run, "train.steps=1"))
    # another base: refused, naming both models, however it is reached
    with pytest.raises(
        SnuggleError,
        match=f"run {run} was trained on a different base model: a model with "
        "hidden 48, 2 layers; this model has hidden 32, 2 layers",
    ):
        load_with_adapter(str(bases["narrow"]), str(run), device="cpu")
    stage = make_cfg(bases["narrow"], bases["corpus"], tmp_path / "stage2", f"model.adapter={run}")
    with pytest.raises(SnuggleError, match=f"model.adapter {run} was trained on a different base model"):
        build_model(stage)
    capfd.readouterr()  # drop what training printed
    args = ["eval", "--model", str(bases["deep"]), "--adapter", str(run), "--data", str(bases["corpus"])]
    assert main([*args, "--seq-len", "16"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hidden 48, 2 layers; this model has hidden 48, 4 layers" in err[0], err
    # the same model under another path (copied, another machine): a warning, and the run's factors load
    with pytest.warns(UserWarning, match=f"run {run} was trained on .*, not on --model {bases['a_copy']}"):
        model, _ = load_with_adapter(str(bases["a_copy"]), str(run), device="cpu")
    assert any(isinstance(m, LoRALinear) for m in model.modules())


def test_config_still_loads_after_the_run(bases, tmp_path):
    """The hardened config parser reads what the trainer writes (config.yaml of a run)."""
    from snuggle.run_dir import run_config
    from snuggle.train.loop import train

    run = tmp_path / "run"
    train(make_cfg(bases["a"], bases["corpus"], run, "train.steps=1", "train.lr=1e-4"))
    cfg = run_config(run)
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.model.path == str(bases["a"])
    assert load_config(run / "config.yaml").train.steps == 1


def test_gguf_tokenizer_invents_no_id_past_the_embedding(bases, tmp_path):
    """transformers gives a byte-level GGUF tokenizer a `<|endoftext|>` the file does not have, one id past
    the model's embedding; snuggle drops it, so a text containing that string cannot index past the rows."""
    from snuggle.io.gguf_export import write_gguf
    from snuggle.train.setup import check_tokenizer_fits

    model, tok = load(bases["a"], dtype=torch.float32, device="cpu")
    path = write_gguf(model, tok, tmp_path / "a.gguf", dtype="f32")
    model, tok = load(path, dtype=torch.float32, device="cpu")
    check_tokenizer_fits(tok, model, str(path))
    assert max(tok("a <|endoftext|> b")["input_ids"]) < model.args.vocab_size


def test_run_adapter_on_a_base_with_other_kv_heads_says_so(bases, tmp_path):
    # same hidden size and depth, so the summary check passes; the tensor shapes then differ, and the
    # message said only "k_proj.lora_B has shape (32, 4), model has (12, 4)"
    from snuggle.train.loop import train

    other = tmp_path / "mqa"
    build_tiny_hf_model("llama", False, other, num_key_value_heads=1)
    run = tmp_path / "run"
    train(make_cfg(bases["a"], bases["corpus"], run, "train.steps=1"))
    with pytest.raises(SnuggleError) as e:
        load_with_adapter(str(other), str(run), device="cpu")
    msg = str(e.value)
    assert "was trained on a different base model or lora config" in msg and "this model has" in msg, msg


def test_peft_adapter_with_lora_on_lm_head_is_named(bases, tmp_path):
    # PEFT can put LoRA on lm_head (target_modules=["lm_head", ...]); snuggle trains it as a full copy,
    # and said only that the tensor was not one it supports
    from safetensors.torch import load_file, save_file

    adapter = peft_adapter(bases["a"], tmp_path / "ad")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 48)
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.zeros(101, 4)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(SnuggleError, match=r"adapter has LoRA on lm_head .*full copies"):
        load_peft_adapter(fresh(bases["a"]), adapter)
