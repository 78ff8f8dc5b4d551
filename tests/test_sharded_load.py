"""FSDP's sharded load: each rank reads one decoder block at a time and keeps only its shards.

In one process: `load_deferred` (the root now, each block on demand) builds exactly what `load` builds,
from every source (HF single and sharded, GGUF, NF4, bitsandbytes 4-bit), and `build_model` with
deferred blocks gives the same model as without: LoRA factors (the same random draws), trained
embeddings, full fine-tuning copies, adapters. On two processes (gloo): a model of 16 blocks loads
with each rank's host peak near half of the model, not the whole, and trains the single-process curve.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_hf_model
from snuggle.config import load_config
from snuggle.errors import SnuggleError
from snuggle.load import load, load_deferred
from snuggle.train.data_parallel import apply_parallel
from snuggle.train.parallel import DistContext
from snuggle.train.setup import build_model
from test_distributed import (
    assert_same_curve,
    assert_same_trainables,
    docs,
    ok,
    overrides,
    run_local,
    torchrun,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _state(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """Every parameter and buffer by name: (value, requires_grad)."""
    out = {n: (p.detach(), p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)}
    out |= {n: (b, False) for n, b in model.named_buffers()}
    return out


def assert_same_model(got: torch.nn.Module, want: torch.nn.Module) -> None:
    g, w = _state(got), _state(want)
    assert list(g) == list(w)  # same names in the same order: FSDP's units and the optimizer see no change
    for name, (t, trains) in w.items():
        assert g[name][1] == trains, name
        assert g[name][0].dtype == t.dtype and g[name][0].device == t.device, name
        torch.testing.assert_close(g[name][0], t, rtol=0, atol=0, msg=name)
    assert (got.lm_head.weight is got.model.embed_tokens.weight) == (
        want.lm_head.weight is want.model.embed_tokens.weight
    )


def deferred(path: Path, **kw) -> torch.nn.Module:
    model, _ = load_deferred(path, device="cpu", with_tokenizer=False, **kw)
    assert any(p.is_meta for p in model.model.layers.parameters())  # nothing of the blocks read yet
    assert not any(p.is_meta for n, p in model.named_parameters() if not n.startswith("model.layers."))
    model.deferred_blocks.fill_all(model)
    return model


def sharded_copy(src: Path, dst: Path, shard: str, dtype: torch.dtype = torch.float32) -> Path:
    """`src` re-saved in `dtype` as several safetensors files with an index (as large HF models come)."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src).to(dtype).save_pretrained(dst, max_shard_size=shard)
    for f in src.iterdir():
        if not f.name.startswith("model") and f.name != "config.json":
            shutil.copy(f, dst / f.name)
    assert len(list(dst.glob("model-*.safetensors"))) > 1
    return dst


# --- one process: the same model as load / build_model ------------------------------------------


@pytest.mark.parametrize("quantize", ["none", "nf4", "fp8"])
@pytest.mark.parametrize("family,tie", [("qwen2", True), ("llama", False)])
def test_deferred_load_builds_what_load_builds(tmp_path, family, tie, quantize):
    path = tmp_path / "m"
    build_tiny_hf_model(family, tie, path)
    want, _ = load(path, device="cpu", with_tokenizer=False, quantize=quantize)
    assert_same_model(deferred(path, quantize=quantize), want)
    # several files with an index: blocks straddle files and come in index order, not block order
    many = sharded_copy(path, tmp_path / "sharded", "40KB")
    assert_same_model(deferred(many, quantize=quantize), want)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_deferred_load_of_gguf(tmp_path, qtype):
    from gguf import GGMLQuantizationType

    from test_gguf import _tiny, _write_gguf

    f = tmp_path / "m.gguf"
    _write_gguf(f, _tiny("llama", tie_word_embeddings=False), "llama", GGMLQuantizationType[qtype])
    want, _ = load(f, device="cpu", with_tokenizer=False)
    assert_same_model(deferred(f), want)


def test_deferred_load_of_a_bitsandbytes_4bit_checkpoint(tiny_hf_model, tmp_path):
    pytest.importorskip("bitsandbytes.functional")
    from test_quant import _write_bnb_checkpoint

    src, _ = tiny_hf_model("llama", True, tmp_path, hidden_size=64, intermediate_size=128, head_dim=16)
    _write_bnb_checkpoint(src, tmp_path / "bnb-4bit")
    for quantize in ("none", "nf4"):
        want, _ = load(tmp_path / "bnb-4bit", device="cpu", with_tokenizer=False, quantize=quantize)
        assert_same_model(deferred(tmp_path / "bnb-4bit", quantize=quantize), want)


def test_a_missing_block_tensor_is_named_before_any_block_is_read(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m"
    build_tiny_hf_model("llama", False, path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SnuggleError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_deferred(path, device="cpu", with_tokenizer=False)


def _cfg(path: Path, tmp_path: Path, *extra: str):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sees the dog.\n")
    return load_config(
        None,
        [f"model.path={path}", f"data.train={corpus}", f"train.output_dir={tmp_path / 'out'}", *extra],
    )


def _built(cfg, defer: bool) -> torch.nn.Module:
    torch.manual_seed(cfg.train.seed)  # as the loop seeds before building, on every rank
    model, _ = build_model(cfg, defer_blocks=True) if defer else build_model(cfg)
    # what the loop does next: apply_parallel reads the deferred blocks (here without sharding them)
    return apply_parallel(model, "none", DistContext(), torch.device("cpu"))


@pytest.mark.parametrize(
    "extra",
    [
        ("lora.r=4", "lora.train_embeddings=true"),
        ("lora.r=4", "lora.targets=[v_proj,q_proj,down_proj]", "model.quantize=nf4"),
        ("lora.r=4", "lora.train_embeddings=true", "model.quantize=fp8"),
        ("lora=null",),
    ],
    ids=["lora-embeddings", "qlora-target-order", "fp8-embeddings", "full"],
)
@pytest.mark.parametrize("family,tie", [("qwen2", True), ("llama", False)])
def test_build_model_with_deferred_blocks_is_the_single_process_model(tmp_path, family, tie, extra):
    """Same LoRA draws (the factors are made while the base is still on meta), same fp32 copies."""
    path = tmp_path / "m"
    build_tiny_hf_model(family, tie, path)
    cfg = _cfg(path, tmp_path, "model.device=cpu", *extra)
    assert_same_model(_built(cfg, defer=True), _built(cfg, defer=False))


def test_build_model_with_deferred_blocks_starts_from_an_adapter(tmp_path):
    """A PEFT adapter (LoRA factors, trained embeddings) lands on the deferred model as on a loaded one."""
    from snuggle.io.peft_format import save_peft_adapter

    path = tmp_path / "m"
    build_tiny_hf_model("llama", False, path)
    lora = ("lora.r=4", "lora.train_embeddings=true")
    trained = _built(_cfg(path, tmp_path, "model.device=cpu", *lora), defer=False)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))  # as if trained: no factor is at its init
    save_peft_adapter(trained, _cfg(path, tmp_path, *lora).lora, str(path), tmp_path / "adapter")
    cfg = _cfg(path, tmp_path, "model.device=cpu", f"model.adapter={tmp_path / 'adapter'}", *lora)
    got = _built(cfg, defer=True)
    assert_same_model(got, _built(cfg, defer=False))
    torch.testing.assert_close(got.lm_head.weight, trained.lm_head.weight, rtol=0, atol=0)


# --- two processes: host memory per rank and the curve -------------------------------------------

# Reports each rank's host memory while the model is built and sharded, then trains as the CLI would.
# clear_refs 5 resets the kernel's peak RSS (VmHWM) to the current RSS, so the peak read after
# apply_parallel is the peak of building the model alone, not of the imports before it: those that
# building does on first use (the tokenizer's, and torch._dynamo, which the meta device pulls in,
# ~80 MB) are made before the baseline is taken.
_HOST_PEAK_SCRIPT = """
import sys
from pathlib import Path

import torch._dynamo
import snuggle.train.loop as loop
from snuggle.cli import main
from snuggle.io.hf import load_hf_tokenizer

def kib(key):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":"))

real_build, real_apply = loop.build_model, loop.apply_parallel
base = {}

def build(*args, **kwargs):
    load_hf_tokenizer(Path(args[0].model.path))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base["kib"] = kib("VmRSS")
    return real_build(*args, **kwargs)

def apply(model, strategy, ctx, device, *rest):
    engine = real_apply(model, strategy, ctx, device, *rest)
    print(f"HOST_PEAK rank={ctx.rank} kib={kib('VmHWM') - base['kib']}", file=sys.stderr, flush=True)
    return engine

loop.build_model, loop.apply_parallel = build, apply
sys.exit(main(sys.argv[1:]))
"""

# 16 blocks of ~15.7 MB in fp32 (hidden 512, MLP 2048): 252 MB in all, against which the ~10 MB that
# building a model also allocates (data, code paged in) are small
_BIG = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=4)


@pytest.mark.distributed
def test_fsdp_ranks_hold_one_block_and_their_shards_and_train_the_single_process_curve(tmp_path):
    root = tmp_path
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(f'{{"text": "{d}"}}\n' for d in docs(60)))
    model = build_tiny_hf_model("llama", False, root / "single", **_BIG)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # fp32, as trained
    del model
    # bf16 on disk, trained in fp32: every tensor is converted, i.e. copied, as it is read (an fp32
    # file would be memory-mapped lazily, and its pages would show only while a tensor is in use)
    path = sharded_copy(root / "single", root / "m", "40MB", torch.bfloat16)  # 4 files
    ref = root / "ref"
    run_local(path, corpus, ref)
    config = root / "config.yaml"
    config.write_text("{}\n")
    script = root / "host_peak.py"
    script.write_text(_HOST_PEAK_SCRIPT)
    out = root / "fsdp"
    args = overrides(path, corpus, out, "train.batch_size=2", "train.parallel=fsdp")
    p = ok(torchrun(str(config), *args, script=script))
    peaks = [int(k) * 1024 for k in re.findall(r"HOST_PEAK rank=\d+ kib=(\d+)", p.stderr)]
    assert len(peaks) == 2, p.stderr[-3000:]
    print(f"model {model_bytes / 2**20:.1f} MiB; host peak per rank while building: "
          f"{', '.join(f'{b / 2**20:.1f} MiB' for b in peaks)}")  # fmt: skip
    # each rank: its half of the blocks, one whole block in flight, the root and LoRA factors (~0.6 of
    # the model at 2 ranks); loading the whole model on every rank (what this replaced) peaked at 1.1
    assert max(peaks) < 0.75 * model_bytes
    assert_same_curve(out, ref)
    # the LoRA init is compared exactly above (one process); here Adam turns fp32 summation-order noise
    # in the first, near-zero gradients of lora_A (lora_B starts at 0) into up to ~2e-4 at hidden 512
    assert_same_trainables(out, ref, atol=1e-3)
