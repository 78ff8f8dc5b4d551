"""Export: PEFT adapters that PEFT loads, merged HF checkpoints that transformers loads, and back again."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from snuggle.config import LoraConfig
from snuggle.errors import SnuggleError
from snuggle.io.hf import save_hf_checkpoint
from snuggle.io.peft_format import load_peft_adapter, merged_state_dict, save_peft_adapter
from snuggle.load import load
from snuggle.lora import ALL_LINEAR, LoRALinear, apply_lora

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # transformers deprecations raised inside peft
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),
]
ATOL = 1e-4
TIES = [pytest.param(False, id="untied"), pytest.param(True, id="tied")]


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(seed))


def _trained(path, cfg: LoraConfig, dtype=torch.float32):
    """A LoRA model as if trained: random B everywhere and perturbed embeddings when they train."""
    model, _ = load(path, dtype=dtype, device="cpu", with_tokenizer=False)
    apply_lora(model, cfg)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0.0, 0.2, generator=g)
        if cfg.train_embeddings:
            for p in {id(p): p for p in (model.model.embed_tokens.weight, model.lm_head.weight)}.values():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("tie", TIES)
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_saved_adapter_loads_in_peft(tiny_hf_model, tmp_path, tie, rslora):
    from peft import PeftModel

    path, hf = tiny_hf_model("llama", tie, tmp_path)
    cfg = LoraConfig(r=4, alpha=8.0, rslora=rslora, train_embeddings=True)
    ours = _trained(path, cfg)
    adapter = tmp_path / "adapter"
    save_peft_adapter(ours, cfg, str(path), adapter)

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8.0, rslora)
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"] and config["bias"] == "none"
    assert config["target_modules"] == list(ALL_LINEAR) and config["base_model_name_or_path"] == str(path)
    assert not list(adapter.glob("*.tmp"))
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as st:
        keys = set(st.keys())
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
        assert (
            torch.equal(
                st.get_tensor("base_model.model.model.embed_tokens.weight"),
                st.get_tensor("base_model.model.lm_head.weight"),
            )
            == tie
        )
    assert len(keys) == 2 * len(ALL_LINEAR) * ours.args.num_layers + 2

    ids = _ids(ours.args.vocab_size)
    with torch.no_grad():
        base = hf(ids).logits
        ref = PeftModel.from_pretrained(hf, str(adapter)).eval()(input_ids=ids).logits
        got = ours(ids)
    assert (got - base).abs().max() > 10 * ATOL  # the adapter and embeddings really change the output
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_adapter_without_embeddings_has_no_modules_to_save(tiny_hf_model, tmp_path):
    path, _ = tiny_hf_model("qwen3", False, tmp_path)
    cfg = LoraConfig(r=2, alpha=2.0, targets=["q_proj", "v_proj"])
    ours = _trained(path, cfg)
    save_peft_adapter(ours, cfg, "some/base", tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(SnuggleError, match="does not match"):
        save_peft_adapter(ours, LoraConfig(r=8, alpha=2.0), "some/base", tmp_path / "ad2")


@pytest.mark.parametrize("tie", TIES)
def test_merged_checkpoint_loads_in_transformers(tiny_hf_model, tmp_path, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = tiny_hf_model("llama", tie, tmp_path)
    ours = _trained(path, LoraConfig(r=4, alpha=8.0, train_embeddings=True))
    ids = _ids(ours.args.vocab_size)
    with torch.no_grad():
        before = ours(ids)
        state = merged_state_dict(ours)
        assert torch.equal(ours(ids), before)  # the live model is untouched
    assert ("lm_head.weight" in state) != tie
    assert not any("lora_" in k for k in state)
    original_tok = AutoTokenizer.from_pretrained(str(path))
    out = tmp_path / "merged"
    save_hf_checkpoint(state, ours.args.hf_config, out, tokenizer=original_tok)

    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, before, atol=ATOL, rtol=0)
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "the quick dog runs in the rain."
    assert tok(text).input_ids == original_tok(text).input_ids and tok.eos_token == "</s>"


def test_merged_state_dict_uses_storage_dtype(tiny_hf_model, tmp_path):
    path, _ = tiny_hf_model("qwen2", True, tmp_path)
    ours = _trained(path, LoraConfig(r=2, alpha=4.0, train_embeddings=True), dtype=torch.bfloat16)
    emb = ours.model.embed_tokens.weight
    assert emb.dtype == torch.float32 and ours.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    state = merged_state_dict(ours)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert torch.equal(state["model.embed_tokens.weight"], emb.detach().to(torch.bfloat16))
    q = ours.model.layers[0].self_attn.q_proj
    want = (q.weight.float() + q.delta_weight()).to(torch.bfloat16)
    assert torch.equal(state["model.layers.0.self_attn.q_proj.weight"], want)
    assert "model.layers.0.self_attn.q_proj.bias" in state  # qwen2's qkv bias survives the merge
    assert isinstance(ours.model.layers[0].self_attn.q_proj, LoRALinear)


@pytest.mark.parametrize("tie", TIES)
def test_load_peft_adapter_round_trip(tiny_hf_model, tmp_path, tie):
    path, _ = tiny_hf_model("mistral", tie, tmp_path)
    cfg = LoraConfig(r=4, alpha=16.0, rslora=True, train_embeddings=True, targets=["q_proj", "down_proj"])
    ours = _trained(path, cfg)
    save_peft_adapter(ours, cfg, str(path), tmp_path / "ad")
    fresh, _ = load(path, dtype=torch.float32, device="cpu", with_tokenizer=False)
    load_peft_adapter(fresh, tmp_path / "ad")
    ids = _ids(ours.args.vocab_size)
    with torch.no_grad():
        assert torch.equal(fresh(ids), ours(ids))
    assert fresh.model.embed_tokens.weight.requires_grad  # ready to continue training
    assert (fresh.lm_head.weight is fresh.model.embed_tokens.weight) == tie


def test_load_adapter_made_by_peft(tiny_hf_model, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    path, hf = tiny_hf_model("qwen2", False, tmp_path)
    pcfg = PeftLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["k_proj", "o_proj", "up_proj"],
        modules_to_save=["embed_tokens", "lm_head"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(hf, pcfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(tmp_path / "ad"))
    ids = _ids(hf.config.vocab_size)
    ours, _ = load(path, dtype=torch.float32, device="cpu", with_tokenizer=False)
    load_peft_adapter(ours, tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), peft_model(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_mismatched_base_raises(tiny_hf_model, tmp_path):
    path, _ = tiny_hf_model("llama", False, tmp_path)
    cfg = LoraConfig(r=4, alpha=8.0, train_embeddings=True)
    save_peft_adapter(_trained(path, cfg), cfg, str(path), tmp_path / "ad")

    other_path, _ = tiny_hf_model("llama", False, tmp_path, hidden_size=32, intermediate_size=64)
    other, _ = load(other_path, dtype=torch.float32, device="cpu", with_tokenizer=False)
    with pytest.raises(SnuggleError, match="was trained on a different base model") as e:
        load_peft_adapter(other, tmp_path / "ad")
    assert "\n" not in str(e.value)
    assert not any(isinstance(m, LoRALinear) for m in other.modules())  # left as it was

    bigger_vocab, _ = tiny_hf_model("llama", False, tmp_path, vocab_size=131)
    model, _ = load(bigger_vocab, dtype=torch.float32, device="cpu", with_tokenizer=False)
    with pytest.raises(SnuggleError, match=r"different base model: .*vocabulary 101; this model has .*131"):
        load_peft_adapter(model, tmp_path / "ad")


def test_bad_adapter_inputs_raise(tiny_hf_model, tmp_path):
    path, _ = tiny_hf_model("llama", True, tmp_path)
    model, _ = load(path, dtype=torch.float32, device="cpu", with_tokenizer=False)
    with pytest.raises(SnuggleError, match="not a PEFT adapter directory"):
        load_peft_adapter(model, tmp_path)

    # an untied adapter (embed_tokens != lm_head) cannot live in a tied model
    untied_path, _ = tiny_hf_model("llama", False, tmp_path)
    cfg = LoraConfig(r=2, alpha=2.0, train_embeddings=True)
    save_peft_adapter(_trained(untied_path, cfg), cfg, str(untied_path), tmp_path / "untied")
    with pytest.raises(SnuggleError, match="ties them"):
        load_peft_adapter(model, tmp_path / "untied")

    config_file = tmp_path / "untied" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(SnuggleError, match="unsupported PEFT option.*use_dora"):
        load_peft_adapter(model, tmp_path / "untied")
