"""`snuggle train | eval | export | generate`: one-line errors with exit status 2, and what each verb writes.

Most cases call `snuggle.cli.main` in-process (a subprocess pays ~3 s of imports each); a few run
`python -m snuggle` for real to cover the entry point, the exit status and the absence of tracebacks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import snuggle.data.sources as sources_mod
from conftest import build_tiny_hf_model
from snuggle.cli import main
from snuggle.config import load_config
from snuggle.data import PackedRows, iterate_eval, resolve_files, tokenize_corpus
from snuggle.generate import generate
from snuggle.load import load
from snuggle.rebuild import load_run
from snuggle.train.evaluate import evaluate
from snuggle.train.loop import train
from snuggle.train.setup import build_data

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # transformers deprecations raised inside peft
]
ATOL = 1e-4
SEQ_LEN = 16
WORDS = "the a cat dog bird fish sees eats red big small old".split()


def corpus_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 25)))) + "." for _ in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def snuggle_subprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snuggle", *args], capture_output=True, text=True, env=env(), timeout=120
    )


def assert_one_error_line(rc: int, out: str, err: str, *fragments: str) -> str:
    """Exit status 2, a single `snuggle: error:` line on stderr naming the problem, and no traceback."""
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("snuggle: error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny base model, a corpus, a LoRA CPT run (trained embeddings) and a full fine-tuning run."""
    root = tmp_path_factory.mktemp("cli")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see conftest.single_thread; a module fixture cannot use that fixture
    try:
        model_dir = root / "base"
        build_tiny_hf_model("llama", False, model_dir)
        corpus = write_jsonl(root / "corpus.jsonl", corpus_docs(50))
        common = [
            f"model.path={model_dir}",
            f"data.train={corpus}",
            f"data.cache_dir={root / 'cache'}",
            f"data.seq_len={SEQ_LEN}",
            "data.val_fraction=0.2",
            "train.batch_size=2",
            "train.lr=0.01",
            "train.progress=false",
        ]
        lora_run, full_run = root / "lora-run", root / "full-run"
        train(
            load_config(
                None,
                [
                    *common,
                    f"train.output_dir={lora_run}",
                    "train.steps=4",
                    "lora.r=4",
                    "lora.alpha=8",
                    "lora.train_embeddings=true",
                ],
            )
        )
        train(load_config(None, [*common, f"train.output_dir={full_run}", "train.steps=2", "lora=null"]))
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "model": model_dir, "corpus": corpus, "lora": lora_run, "full": full_run}


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    # `snuggle eval` caches tokens under $SNUGGLE_CACHE: keep it out of the home directory. main() sets
    # HF_HUB_OFFLINE in os.environ; setting it here first means monkeypatch restores it afterwards.
    monkeypatch.setenv("SNUGGLE_CACHE", str(tmp_path / "eval-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --- train: bad input -----------------------------------------------------------------------------


def write_config(tmp_path: Path, runs: dict[str, Path], **sections) -> Path:
    tree = {
        "model": {"path": str(runs["model"])},
        "lora": {"r": 4},
        "data": {"train": str(runs["corpus"]), "seq_len": SEQ_LEN, "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 1, "output_dir": str(tmp_path / "out"), "progress": False},
    }
    for section, values in sections.items():
        tree[section].update(values)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def bad_model_type_dir(tmp_path: Path) -> Path:
    d = tmp_path / "gpt2-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return d


# each case: (config sections or overrides built from tmp_path, message fragments)
BAD_TRAIN_INPUTS = {
    "missing-model": (lambda t: {"model": {"path": str(t / "nope")}}, ["model path not found", "nope"]),
    "not-gguf": (
        lambda t: {"model": {"path": str(t / "weights.bin")}},
        ["unsupported model file", "weights.bin", ".gguf"],
    ),
    "unsupported-model-type": (
        lambda t: {"model": {"path": str(bad_model_type_dir(t))}},
        ["unsupported architecture", "gpt2"],
    ),
    "corpus-missing": (
        lambda t: {"data": {"train": str(t / "none.jsonl")}},
        ["does not exist", "none.jsonl"],
    ),
    "empty-corpus": (
        lambda t: {"data": {"train": str(t / "empty.jsonl")}},
        ["corpus is empty", "empty.jsonl"],
    ),
    "invalid-utf8": (lambda t: {"data": {"train": str(t / "latin1.txt")}}, ["latin1.txt", "invalid UTF-8"]),
    "malformed-jsonl": (
        lambda t: {"data": {"train": str(t / "broken.jsonl")}},
        ["broken.jsonl:3: malformed JSON"],
    ),
    "missing-text-field": (
        lambda t: {"data": {"train": str(t / "fields.jsonl")}},
        ["fields.jsonl:1: missing field 'text'", "body"],
    ),
    "unknown-key": (lambda t: {"train": {"stepz": 3}}, ["unknown config key 'train.stepz'"]),
    "wrong-type": (
        lambda t: {"train": {"steps": "many"}},
        ["config key 'train.steps' must be int", "'many'"],
    ),
    "seq-len-too-long": (lambda t: {"data": {"seq_len": 512}}, ["data.seq_len 512", "limit of 256"]),
    "bad-lora-target": (lambda t: {"lora": {"targets": ["qkv"]}}, ["unknown LoRA target", "qkv"]),
}


@pytest.fixture
def bad_files(tmp_path) -> Path:
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    (tmp_path / "empty.jsonl").write_text('\n{"text": "   "}\n\n')
    (tmp_path / "latin1.txt").write_bytes("the cat caf\u00e9 dog".encode("latin-1"))
    (tmp_path / "broken.jsonl").write_text('{"text": "the cat"}\n\n{"text": "the dog"\n')
    (tmp_path / "fields.jsonl").write_text('{"body": "the cat"}\n')
    return tmp_path


@pytest.mark.parametrize("case", list(BAD_TRAIN_INPUTS))
def test_train_bad_input_is_one_line_and_writes_nothing(runs, bad_files, capfd, case):
    sections, fragments = BAD_TRAIN_INPUTS[case]
    config = write_config(bad_files, runs, **sections(bad_files))
    rc = main(["train", str(config)])
    out, err = capfd.readouterr()
    assert_one_error_line(rc, out, err, *fragments)
    assert not (bad_files / "out").exists()


def test_train_unreadable_corpus(runs, tmp_path, capfd, monkeypatch):
    # root reads mode-000 files, so the permission error is injected at the open() the reader uses
    corpus = write_jsonl(tmp_path / "secret.jsonl", ["the cat"])
    real_open = open

    def deny(path, *args, **kwargs):
        if Path(path) == corpus.resolve():
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(sources_mod, "open", deny, raising=False)
    rc = main(["train", str(write_config(tmp_path, runs, data={"train": str(corpus)}))])
    out, err = capfd.readouterr()
    assert_one_error_line(rc, out, err, "secret.jsonl", "cannot read training file: Permission denied")
    assert not (tmp_path / "out").exists()


def test_train_invalid_yaml_and_bad_overrides(runs, tmp_path, capfd):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: [unclosed\n")
    rc = main(["train", str(bad)])
    assert_one_error_line(rc, *capfd.readouterr(), "bad.yaml", "invalid YAML")

    config = write_config(tmp_path, runs)
    rc = main(["train", str(config), "train.steps"])
    assert_one_error_line(rc, *capfd.readouterr(), "must look like section.key=value")
    rc = main(["train", str(config), "train.lr=fast"])
    assert_one_error_line(rc, *capfd.readouterr(), "config key 'train.lr' must be float")
    rc = main(["train", str(tmp_path / "missing.yaml")])
    assert_one_error_line(rc, *capfd.readouterr(), "cannot read config", "missing.yaml")
    assert not (tmp_path / "out").exists()


def test_train_refuses_an_output_dir_holding_a_run(runs, tmp_path, capfd):
    config = write_config(tmp_path, runs, train={"output_dir": str(runs["lora"])})
    before = {p: p.stat().st_mtime_ns for p in runs["lora"].rglob("*")}
    rc = main(["train", str(config)])
    assert_one_error_line(
        rc, *capfd.readouterr(), str(runs["lora"]), "holds another run", "train.resume=true"
    )
    assert {p: p.stat().st_mtime_ns for p in runs["lora"].rglob("*")} == before


def test_train_error_through_the_real_entry_point(runs, tmp_path):
    config = write_config(tmp_path, runs, model={"path": str(bad_model_type_dir(tmp_path))})
    p = snuggle_subprocess("train", str(config), f"train.output_dir={tmp_path / 'sub-out'}")
    assert_one_error_line(p.returncode, p.stdout, p.stderr, "gpt2")
    assert not (tmp_path / "sub-out").exists()


def test_train_prints_a_json_summary(runs, tmp_path, capfd):
    config = write_config(tmp_path, runs, train={"steps": 2})
    assert main(["train", str(config)]) == 0
    out, err = capfd.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["output_dir"] == str(tmp_path / "out")
    assert all(math.isfinite(summary[k]) for k in ("final_loss", "eval_loss_before", "eval_loss"))
    assert "Traceback" not in err and (tmp_path / "out" / "latest").is_file()


def test_resuming_a_complete_run_prints_strict_json_with_its_final_loss(runs, tmp_path, capfd, monkeypatch):
    # nothing trains when the run is complete: the summary said "final_loss": NaN, which is not JSON
    config = write_config(tmp_path, runs, train={"steps": 2})
    assert main(["train", str(config)]) == 0
    first = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert main(["train", str(config), "train.resume=true"]) == 0
    out, err = capfd.readouterr()
    again = json.loads(out.strip().splitlines()[-1], parse_constant=lambda c: pytest.fail(f"{c} in {out}"))
    assert again["final_loss"] == first["final_loss"] and "complete at step 2 of 2" in err
    # any other non-finite figure (a run whose last step was skipped) is null, never NaN
    import snuggle.train.loop as loop_mod

    monkeypatch.setattr(loop_mod, "train", lambda cfg: {"final_loss": float("nan"), "warning": "w"})
    assert main(["train", str(config), "train.resume=true"]) == 0
    assert json.loads(capfd.readouterr().out.strip(), parse_constant=pytest.fail)["final_loss"] is None


# --- eval -----------------------------------------------------------------------------------------


def eval_json(capfd, *args: str) -> dict:
    assert main(["eval", *args]) == 0
    out, err = capfd.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


def rows_of(corpus: Path, tok, cache: Path) -> PackedRows:
    return PackedRows(tokenize_corpus(resolve_files(str(corpus)), tok, cache_dir=cache), SEQ_LEN)


def test_eval_base_and_adapter(runs, tmp_path, capfd):
    args = ["--model", str(runs["model"]), "--data", str(runs["corpus"]), "--seq-len", str(SEQ_LEN)]
    base = eval_json(capfd, *args)
    assert set(base) == {"loss", "perplexity", "tokens", "format"} and base["format"] == "text"
    assert base["perplexity"] == pytest.approx(np.exp(base["loss"]), rel=1e-12)

    # the base model's loss over every row of the corpus, computed here from the pieces
    model, tok = load(runs["model"], device="cpu")
    rows = rows_of(runs["corpus"], tok, tmp_path / "c")
    assert base["tokens"] == sum(int((rows[i]["labels"] != -100).sum()) for i in range(len(rows)))
    ref = evaluate(model, iterate_eval(rows, np.arange(len(rows)), 4), torch.device("cpu"))
    assert base["loss"] == pytest.approx(ref["loss"], abs=1e-6)

    tuned = eval_json(capfd, *args, "--adapter", str(runs["lora"]), "--batch-size", "3")
    assert tuned["tokens"] == base["tokens"]
    assert tuned["loss"] < base["loss"] - 0.1  # trained on this very corpus

    # the trained model the trainer evaluated: its final eval_loss over the held-out rows ...
    trained, tok, cfg = load_run(runs["lora"])
    data = build_data(cfg.data, tok, cfg.train.seed, trained.args.max_position_embeddings)
    final = json.loads((runs["lora"] / "metrics.jsonl").read_text().splitlines()[-1])
    held_out = evaluate(trained, iterate_eval(data.rows, data.val_idx, 1), torch.device("cpu"))
    assert (final["step"], final["eval_tokens"]) == (4, held_out["tokens"])
    # fp32 sums batched differently (1 row here, batch_size 2 in the trainer): equal to ~1e-7
    assert final["eval_loss"] == pytest.approx(held_out["loss"], abs=1e-6)
    # ... and the same evaluation over every row is what `snuggle eval --adapter` printed
    everything = evaluate(trained, iterate_eval(data.rows, np.arange(len(data.rows)), 2), torch.device("cpu"))
    assert tuned["loss"] == pytest.approx(everything["loss"], abs=1e-6)

    capped = eval_json(capfd, *args, "--max-rows", "3")
    assert capped["tokens"] == sum(int((rows[i]["labels"] != -100).sum()) for i in range(3))


def test_eval_dtype_applies_to_a_run_adapter(runs, capfd):
    """--dtype is honoured with a run directory as --adapter (it used to be dropped for the run's own
    model.dtype); without --dtype the run's dtype is kept."""
    from snuggle.rebuild import load_with_adapter

    model, _ = load_with_adapter(str(runs["model"]), str(runs["lora"]), dtype="bfloat16", device="cpu")
    assert model.compute_dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    kept, _ = load_with_adapter(str(runs["model"]), str(runs["lora"]), device="cpu")
    assert kept.compute_dtype == torch.float32  # the run's (CPU) dtype
    args = ["--model", str(runs["model"]), "--adapter", str(runs["lora"]), "--data", str(runs["corpus"])]
    args += ["--seq-len", str(SEQ_LEN), "--max-rows", "4"]
    fp32 = eval_json(capfd, *args, "--dtype", "float32")
    bf16 = eval_json(capfd, *args, "--dtype", "bfloat16")
    assert eval_json(capfd, *args) == fp32
    assert bf16["tokens"] == fp32["tokens"] and bf16["loss"] != fp32["loss"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], abs=0.05)


def test_eval_bad_input(runs, tmp_path, capfd):
    model, corpus = str(runs["model"]), str(runs["corpus"])
    other = tmp_path / "other"  # another base: the run's LoRA factors do not fit its hidden size
    build_tiny_hf_model("llama", False, other, hidden_size=32, intermediate_size=64)
    capfd.readouterr()  # drop what building the other model printed
    cases = [
        (["--model", model, "--data", corpus, "--seq-len", "300"], ["--seq-len 300", "limit of 256"]),
        (["--model", model, "--data", str(tmp_path / "no.txt")], ["does not exist", "no.txt"]),
        (["--model", str(tmp_path / "none"), "--data", corpus], ["model path not found"]),
        (["--model", model, "--data", corpus, "--max-rows", "0"], ["--max-rows must be >= 1"]),
        (["--model", model, "--data", corpus, "--adapter", str(tmp_path)], ["not a run directory", "PEFT"]),
        # a run's adapter on another base model is refused (by its shapes), not silently swapped for
        # the run's base; a differing path alone is only a warning (tests/test_mismatch.py)
        (
            ["--model", str(other), "--data", corpus, "--adapter", str(runs["lora"])],
            ["was trained on a different base model", "hidden 48", "this model has hidden 32"],
        ),
    ]
    for args, fragments in cases:
        assert_one_error_line(main(["eval", *args]), *capfd.readouterr(), *fragments)


# --- export ---------------------------------------------------------------------------------------


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


IDS = torch.randint(4, 97, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("run", ["lora", "full"])
def test_export_hf_loads_in_transformers(runs, tmp_path, capfd, run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    assert main(["export", str(runs[run]), "--format", "hf", "--out", str(out)]) == 0
    assert json.loads(capfd.readouterr().out) == {"format": "hf", "out": str(out)}
    assert not list(tmp_path.glob(".*tmp*"))  # written beside and renamed into place
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours, tok, _ = load_run(runs[run])
    torch.testing.assert_close(logits_of(hf, IDS), logits_of(ours, IDS), rtol=0, atol=ATOL)
    # and it is not simply the base model
    base = AutoModelForCausalLM.from_pretrained(str(runs["model"]), dtype=torch.float32).eval()
    assert (logits_of(hf, IDS) - logits_of(base, IDS)).abs().max() > 1e-2
    assert AutoTokenizer.from_pretrained(str(out))("the cat")["input_ids"] == tok("the cat")["input_ids"]


def test_a_run_with_relative_paths_exports_from_another_directory(runs, tmp_path, capfd, monkeypatch):
    # config.yaml recorded model.path as given; `snuggle export RUN` run from elsewhere then found no
    # model ("model path not found: base"), although the run directory is all export should need
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(runs["model"], work / "base")
    shutil.copy(runs["corpus"], work / "corpus.jsonl")
    monkeypatch.chdir(work)
    overrides = ["model.path=base", "data.train=corpus.jsonl", "data.cache_dir=cache", "lora.r=4"]
    overrides += [f"data.seq_len={SEQ_LEN}", "train.steps=1", "train.output_dir=run", "train.progress=false"]
    assert main(["train", str(write_empty(work)), *overrides]) == 0
    saved = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert saved["model"]["path"] == str(work / "base") and saved["data"]["train"] == str(
        work / "corpus.jsonl"
    )
    assert saved["data"]["cache_dir"] == str(work / "cache") and saved["train"]["output_dir"] == "run"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capfd.readouterr()
    assert main(["export", str(work / "run"), "--format", "hf", "--out", "hf"]) == 0, capfd.readouterr().err
    assert (elsewhere / "hf" / "config.json").is_file()
    # and resuming from the first directory still sees the same settings
    monkeypatch.chdir(work)
    assert main(["train", str(write_empty(work)), *overrides, "train.resume=true"]) == 0


def test_export_of_a_run_whose_base_moved_takes_model(runs, tmp_path, capfd):
    # the run as copied to another machine, where its recorded model.path names nothing
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["path"] = str(tmp_path / "where-it-was")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rc = main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "no")])
    assert_one_error_line(rc, *capfd.readouterr(), "model path not found")
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(out), "--model", str(runs["model"])]) == 0
    capfd.readouterr()
    moved, _ = load(str(out))
    ours, _, _ = load_run(runs["lora"])
    torch.testing.assert_close(logits_of(moved, IDS), logits_of(ours, IDS), rtol=0, atol=ATOL)


def write_empty(where: Path) -> Path:
    f = where / "empty.yaml"
    f.write_text("{}\n")
    return f


def test_export_peft_loads_in_peft(runs, tmp_path, capfd):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    assert main(["export", str(runs["lora"]), "--format", "peft", "--out", str(out)]) == 0
    capfd.readouterr()
    base = AutoModelForCausalLM.from_pretrained(str(runs["model"]), dtype=torch.float32).eval()
    base_logits = logits_of(base, IDS)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    ours, _, _ = load_run(runs["lora"])
    torch.testing.assert_close(logits_of(peft_model, IDS), logits_of(ours, IDS), rtol=0, atol=ATOL)
    assert (logits_of(peft_model, IDS) - base_logits).abs().max() > 1e-2

    # snuggle reads its own PEFT export back: eval through it equals eval through the run directory
    args = ["--model", str(runs["model"]), "--data", str(runs["corpus"]), "--seq-len", str(SEQ_LEN)]
    via_adapter = eval_json(capfd, *args, "--adapter", str(out))
    via_run = eval_json(capfd, *args, "--adapter", str(runs["lora"]))
    assert via_adapter["loss"] == pytest.approx(via_run["loss"], abs=1e-6)


def test_export_peft_of_a_run_on_a_gguf_base_loads_the_usual_way(runs, tmp_path, capfd, monkeypatch):
    """PEFT loads the base from base_model_name_or_path, which cannot be a .gguf file: --with-base writes
    it beside the adapter as an HF model, so AutoPeftModelForCausalLM.from_pretrained(OUT) loads the run;
    without it, the export says so."""
    from peft import AutoPeftModelForCausalLM

    gguf = tmp_path / "base.gguf"
    assert main(["export", str(runs["full"]), "--format", "gguf", "--out", str(gguf), "--dtype", "f32"]) == 0
    run = tmp_path / "run"
    common = [f"model.path={gguf}", f"data.train={runs['corpus']}", f"data.seq_len={SEQ_LEN}"]
    cfg = load_config(None, [*common, "data.val_fraction=0", "lora.r=4", "train.steps=2", "train.lr=0.01"])
    cfg.train.output_dir, cfg.train.progress = str(run), False
    cfg.data.cache_dir = str(runs["root"] / "cache")
    train(cfg)
    capfd.readouterr()
    out = tmp_path / "adapter"
    assert main(["export", str(run), "--format", "peft", "--out", str(out), "--with-base"]) == 0
    capfd.readouterr()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        out.resolve() / "base"
    )
    monkeypatch.chdir(tmp_path)  # the recorded path does not depend on the working directory
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours, _, _ = load_run(run)
    torch.testing.assert_close(logits_of(peft_model, IDS), logits_of(ours, IDS), rtol=0, atol=ATOL)

    bare = tmp_path / "bare"
    with pytest.warns(UserWarning, match=r"the base is a GGUF file \(base.gguf\).*--with-base"):
        assert main(["export", str(run), "--format", "peft", "--out", str(bare)]) == 0
    assert not (bare / "base").exists()
    capfd.readouterr()
    rc = main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"), "--with-base"])
    assert_one_error_line(rc, *capfd.readouterr(), "--with-base applies to --format peft")


def test_export_refusals(runs, tmp_path, capfd):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    rc = main(["export", str(runs["lora"]), "--format", "hf", "--out", str(taken)])
    assert_one_error_line(rc, *capfd.readouterr(), str(taken), "exists and is not empty")
    assert [p.name for p in taken.iterdir()] == ["keep.txt"] and (taken / "keep.txt").read_text() == "mine"

    out = tmp_path / "peft-of-full"
    rc = main(["export", str(runs["full"]), "--format", "peft", "--out", str(out)])
    assert_one_error_line(rc, *capfd.readouterr(), "--format peft needs a LoRA run", "--format hf")
    assert not out.exists() and not list(tmp_path.glob(".*"))  # no half-written export either

    rc = main(["export", str(tmp_path), "--out", str(tmp_path / "x")])
    assert_one_error_line(rc, *capfd.readouterr(), "not a snuggle run directory")


# the merged model's logits through a GGUF of each type: max |error| / max |logit| (test_gguf_export.py
# explains these bounds; f32 is exact up to float summation order)
GGUF_REL = {"f32": 1e-5, "f16": 4e-3}


@pytest.mark.parametrize("dtype", list(GGUF_REL))
def test_export_gguf_loads_back_and_generates(runs, tmp_path, capfd, dtype):
    import snuggle

    out = tmp_path / "model.gguf"
    assert main(["export", str(runs["lora"]), "--format", "gguf", "--out", str(out), "--dtype", dtype]) == 0
    assert json.loads(capfd.readouterr().out) == {"format": "gguf", "out": str(out), "dtype": dtype}
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temp file left beside it
    gguf_model, gguf_tok = snuggle.load(out, device="cpu")
    merged, tok, _ = load_run(runs["lora"])
    want, got = logits_of(merged, IDS), logits_of(gguf_model, IDS)
    assert (got - want).abs().max() <= GGUF_REL[dtype] * want.abs().max()
    base, _ = load(runs["model"], device="cpu")
    assert (logits_of(base, IDS) - got).abs().max() > 1e-2  # the LoRA is merged in
    assert gguf_tok("the cat sees")["input_ids"] == tok("the cat sees")["input_ids"]

    if dtype == "f32":
        # and `snuggle generate` runs on the file: greedy, the run's own continuation
        prompt = "the dog sees"
        assert main(["generate", "--model", str(out), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
        assert capfd.readouterr().out == prompt + expected_text(merged, tok, prompt, 6) + "\n"


def test_export_gguf_refusals(runs, tmp_path, capfd):
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"mine")
    rc = main(["export", str(runs["lora"]), "--format", "gguf", "--out", str(taken)])
    assert_one_error_line(rc, *capfd.readouterr(), "--out", "exists")
    assert taken.read_bytes() == b"mine"
    rc = main(["export", str(runs["lora"]), "--format", "gguf", "--out", str(tmp_path / "no" / "m.gguf")])
    assert_one_error_line(rc, *capfd.readouterr(), "does not exist")
    rc = main(
        ["export", str(runs["lora"]), "--format", "hf", "--out", str(tmp_path / "hf"), "--dtype", "q8_0"]
    )
    assert_one_error_line(rc, *capfd.readouterr(), "--format hf writes f16, bf16, f32")
    rc = main(
        ["export", str(runs["lora"]), "--format", "peft", "--out", str(tmp_path / "p"), "--dtype", "f16"]
    )
    assert_one_error_line(rc, *capfd.readouterr(), "--dtype applies to --format hf and gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]


def test_export_hf_keeps_the_base_checkpoints_dtype(runs, tmp_path, capfd):
    # a bf16 base trained on the CPU (dtype auto: fp32) came back as an fp32 model, twice its size
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(runs["model"]), dtype=torch.bfloat16).save_pretrained(base)
    for f in runs["model"].glob("tokenizer*"):
        (base / f.name).write_bytes(f.read_bytes())
    overrides = [f"model.path={base}", f"data.train={runs['corpus']}", f"data.seq_len={SEQ_LEN}"]
    overrides += ["lora.r=4", "train.steps=1", f"train.output_dir={tmp_path / 'run'}", "train.progress=false"]
    assert main(["train", str(write_empty(tmp_path)), *overrides]) == 0

    def dtypes(d: Path) -> set[str]:
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return {str(f.get_tensor(k).dtype) for k in f.keys()}

    for flag, want in ((), "torch.bfloat16"), (("--dtype", "f32"), "torch.float32"):
        out = tmp_path / f"hf{len(flag)}"
        assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(out), *flag]) == 0
        assert dtypes(out) == {want}, flag
    capfd.readouterr()


# --- generate -------------------------------------------------------------------------------------


def expected_text(model, tok, prompt: str, n: int) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    return tok.decode(generate(model, ids, n, eos_token_ids={tok.eos_token_id}), skip_special_tokens=True)


def test_generate_through_the_real_entry_point(runs):
    p = snuggle_subprocess(
        "generate", "--model", str(runs["model"]), "--prompt", "the cat", "--max-new-tokens", "5"
    )
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    model, tok = load(runs["model"], device="cpu")
    assert p.stdout == "the cat" + expected_text(model, tok, "the cat", 5) + "\n"


def test_generate_with_adapter(runs, capfd):
    prompt = "the dog sees"
    args = ["generate", "--model", str(runs["model"]), "--prompt", prompt, "--max-new-tokens", "5"]
    assert main([*args, "--adapter", str(runs["lora"])]) == 0
    out, err = capfd.readouterr()
    model, tok, _ = load_run(runs["lora"])
    continuation = expected_text(model, tok, prompt, 5)
    assert continuation.strip() and out == prompt + continuation + "\n"

    assert main([*args, "--adapter", str(runs["lora"]), "--no-echo"]) == 0
    assert capfd.readouterr().out == continuation + "\n"

    # sampling is seeded: the same seed prints the same text
    sample = [*args, "--temperature", "1.0", "--top-p", "0.9", "--seed", "3"]
    assert main(sample) == 0 and main(sample) == 0
    first, second = capfd.readouterr().out.splitlines()
    assert first == second and first.startswith(prompt)


def test_generate_edge_inputs(runs, capfd):
    model = str(runs["model"])
    # a prompt that encodes to nothing starts from BOS instead of failing inside the model
    assert main(["generate", "--model", model, "--prompt", "", "--max-new-tokens", "3"]) == 0
    out, err = capfd.readouterr()
    assert out.endswith("\n") and "Traceback" not in err
    rc = main(["generate", "--model", model, "--prompt", "the", "--temperature", "1", "--top-p", "0"])
    assert_one_error_line(rc, *capfd.readouterr(), "--top-p must be in (0, 1]")
    rc = main(["generate", "--model", str(runs["root"] / "nope"), "--prompt", "the"])
    assert_one_error_line(rc, *capfd.readouterr(), "model path not found")
    # the tiny model has 256 positions: a prompt that fills them is refused, a request past them said
    rc = main(["generate", "--model", model, "--prompt", "the cat " * 200, "--max-new-tokens", "2"])
    assert_one_error_line(rc, *capfd.readouterr(), "positions, so no token is left to add")
    with pytest.warns(UserWarning, match="exceed the model's 256 positions: generation stops after"):
        assert main(["generate", "--model", model, "--prompt", "the", "--max-new-tokens", "300"]) == 0
    capfd.readouterr()
    # values that used to be taken silently: no tokens at all, and a "temperature" that meant greedy
    rc = main(["generate", "--model", model, "--prompt", "the", "--max-new-tokens", "-3"])
    assert_one_error_line(rc, *capfd.readouterr(), "--max-new-tokens must be >= 1, got -3")
    for t in ("-0.5", "nan", "inf"):
        rc = main(["generate", "--model", model, "--prompt", "the", "--temperature", t])
        assert_one_error_line(rc, *capfd.readouterr(), "--temperature must be a finite number >= 0")


def test_eval_cache_dir_puts_the_token_cache_there(runs, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("SNUGGLE_CACHE", str(tmp_path / "default"))
    args = ["--model", str(runs["model"]), "--data", str(runs["corpus"]), "--seq-len", str(SEQ_LEN)]
    here = eval_json(capfd, *args, "--cache-dir", str(tmp_path / "mine"))
    assert any((tmp_path / "mine").iterdir()) and not (tmp_path / "default").exists()
    assert eval_json(capfd, *args) == here  # the same result from the default cache


@pytest.mark.parametrize(
    ("flag", "value", "least"), [("--seq-len", 0, 2), ("--seq-len", 1, 2), ("--batch-size", 0, 1)]
)
def test_eval_flags_below_their_least_are_named_as_typed(runs, capfd, flag, value, least):
    # a row of one token has no next token to score: --seq-len 1 "evaluated" nothing for minutes
    rc = main(["eval", "--model", str(runs["model"]), "--data", str(runs["corpus"]), flag, str(value)])
    assert_one_error_line(rc, *capfd.readouterr(), f"{flag} must be >= {least}, got {value}")


# ChatML as SmolLM2 and Qwen write it (the tiny tokenizer drops "\n", so turns end in a space)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(runs) -> Path:
    """The base model with a chat tokenizer: ChatML special tokens (ids 97, 98 < 101 rows) and template."""
    from transformers import AutoTokenizer

    out = runs["root"] / "chat-model"
    if not out.exists():
        out.mkdir()
        for f in runs["model"].iterdir():
            if f.name in ("config.json", "model.safetensors"):
                (out / f.name).symlink_to(f)
        tok = AutoTokenizer.from_pretrained(str(runs["model"]))
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML
        tok.save_pretrained(str(out))
    return out


class Spy:
    """Hooks a loaded model: records the prompt ids it is given, and makes `force` the argmax of the
    `force_at`-th forward (1 = the prompt), so a test knows exactly where generation must stop."""

    def __init__(self, monkeypatch, force: int | None = None, force_at: int = 0):
        import snuggle.rebuild as rebuild_mod

        self.prompts: list[list[int]] = []
        self.forwards = 0
        real = rebuild_mod.load_with_adapter

        def load_and_hook(*args, **kwargs):
            model, tok = real(*args, **kwargs)
            model.register_forward_pre_hook(self._record)
            model.lm_head.register_forward_hook(self._force)
            return model, tok

        self.force, self.force_at = force, force_at
        monkeypatch.setattr(rebuild_mod, "load_with_adapter", load_and_hook)

    def _record(self, module, inputs):
        if self.forwards == 0:  # the prefill: the whole prompt
            self.prompts.append(inputs[0][0].tolist())

    def _force(self, module, inputs, output):
        self.forwards += 1
        if self.force is not None and self.forwards == self.force_at:
            output = output.clone()
            output[..., self.force] = output.abs().max() * 10 + 100
            return output
        return None


def test_generate_chat_wraps_the_prompt_in_the_template(runs, chat_model, capfd, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_model))
    args = ["generate", "--model", str(chat_model), "--prompt", "a dog?", "--max-new-tokens", "3"]
    spy = Spy(monkeypatch)
    assert main(args) == 0  # default: chat, because the tokenizer has a template
    user = [{"role": "user", "content": "a dog?"}]
    want = tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert spy.prompts[0] == list(want)
    assert spy.prompts[0][:1] == [tok.convert_tokens_to_ids("<|im_start|>")]
    out = capfd.readouterr().out
    assert not out.startswith("a dog?")  # a chat reply is printed alone

    spy = Spy(monkeypatch)
    assert main([*args, "--system", "be small"]) == 0
    system = [{"role": "system", "content": "be small"}, *user]
    assert spy.prompts[0] == list(
        tok.apply_chat_template(system, tokenize=True, add_generation_prompt=True, return_dict=False)
    )
    spy = Spy(monkeypatch)
    assert main([*args, "--no-chat"]) == 0
    assert spy.prompts[0] == tok("a dog?")["input_ids"]
    assert capfd.readouterr().out.splitlines()[-1].startswith("a dog?")

    rc = main([*args, "--no-chat", "--system", "x"])
    assert_one_error_line(rc, *capfd.readouterr(), "--system needs chat mode")
    # a tokenizer without a template: raw text unless --chat asks for snuggle's fallback template
    spy = Spy(monkeypatch)
    assert (
        main(["generate", "--model", str(runs["model"]), "--prompt", "a dog", "--max-new-tokens", "1"]) == 0
    )
    assert spy.prompts[0] == tok("a dog")["input_ids"]
    rc = main(["generate", "--model", str(runs["model"]), "--prompt", "a dog", "--system", "x"])
    assert_one_error_line(rc, *capfd.readouterr(), "--system needs chat mode", "--chat")


def test_generate_chat_stops_at_end_of_turn(chat_model, capfd, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_model))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tok.eos_token_id  # so stopping there is the template's doing, not EOS
    args = ["generate", "--model", str(chat_model), "--prompt", "a dog?", "--max-new-tokens", "20"]
    # the 3rd forward (prompt, then 2 tokens) makes <|im_end|> the argmax: 3 tokens, the last one not printed
    spy = Spy(monkeypatch, force=im_end, force_at=3)
    assert main(args) == 0
    assert spy.forwards == 3
    out = capfd.readouterr().out
    assert "im_end" not in out and out.endswith("\n")
    # raw text mode stops only at EOS: the same forced token does not end it
    spy = Spy(monkeypatch, force=im_end, force_at=3)
    assert main([*args, "--no-chat"]) == 0
    assert spy.forwards == 20


# --- help -----------------------------------------------------------------------------------------


def test_help_through_the_real_entry_point():
    p = snuggle_subprocess("--help")
    assert p.returncode == 0 and p.stderr == ""
    for verb in ("train", "eval", "export", "generate"):
        assert verb in p.stdout


@pytest.mark.parametrize("verb", ["train", "eval", "export", "generate"])
def test_verb_help(verb, capsys):
    with pytest.raises(SystemExit) as ei:
        main([verb, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: snuggle {verb}")


def test_version(capsys):
    import snuggle

    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0
    assert capsys.readouterr().out.strip() == f"snuggle {snuggle.__version__}"


def test_every_argument_is_described():
    import argparse

    from snuggle.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    undescribed = [
        f"{verb} {a.dest}"
        for verb, sp in verbs.items()
        for a in sp._actions
        if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())
    ]
    assert undescribed == []


def test_cuda_device_without_gpu_is_one_line(tiny_hf_model, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path, _ = tiny_hf_model("llama", True, tmp_path)
    capsys.readouterr()
    rc = main(["generate", "--model", str(path), "--prompt", "hi", "--device", "cuda"])
    err = capsys.readouterr().err
    assert (
        rc == 2 and err.startswith("snuggle: error:") and "CUDA" in err and len(err.strip().splitlines()) == 1
    )


def test_own_warnings_are_one_line():
    import snuggle.cli as cli_mod

    inside = str(Path(cli_mod.__file__).parent / "data" / "instruct.py")
    assert (
        cli_mod._format_warning("3 of 9 truncated", UserWarning, inside, 7)
        == "snuggle: warning: 3 of 9 truncated\n"
    )
    # anything else keeps Python's format, with its location
    assert "elsewhere.py:7: UserWarning: x" in cli_mod._format_warning("x", UserWarning, "/elsewhere.py", 7)
    assert "FutureWarning" in cli_mod._format_warning("x", FutureWarning, inside, 7)


def test_nproc_launches_unless_torchrun_started_this_process(runs, tmp_path, monkeypatch):
    """A LOCAL_WORLD_SIZE left in the shell alone made --nproc 2 one silent process (half the batch)."""
    import snuggle.cli as cli

    launched = []
    monkeypatch.setattr(cli, "_launch", lambda n, args, restarts: launched.append(n) or 0)
    config = str(write_config(tmp_path, runs))
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert main(["train", config, "--nproc", "2"]) == 0 and launched == [2]
    # inside a torchrun worker (all its variables set) a different count is refused, naming both
    for key, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "1"),
    ):
        monkeypatch.setenv(key, value)
    with pytest.raises(cli.SnuggleError, match="--nproc 3 but torchrun started 2 processes"):
        cli._cmd_train(cli.build_parser().parse_args(["train", config, "--nproc", "3"]))


def test_max_restarts_launches_torchrun_even_for_one_process_and_checks_the_global_batch_first(
    runs, tmp_path, monkeypatch, capsys
):
    """Restarts need a launcher that outlives the workers; an indivisible global batch is one line
    before any worker starts, not one per (re)started worker."""
    import snuggle.cli as cli

    launched = []
    monkeypatch.setattr(
        cli, "_launch", lambda n, args, restarts: launched.append((n, args[-1], restarts)) or 0
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    config = str(write_config(tmp_path, runs))
    assert main(["train", config, "--max-restarts", "2", "train.resume=auto"]) == 0
    assert launched == [(1, "train.max_restarts=2", 2)]  # the workers see the count in their config
    assert main(["train", config, "--nproc", "3", "train.global_batch=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("snuggle: error: train.global_batch=4 (4 rows a step) is not a multiple of 3")
    assert main(["train", config, "--nproc", "2", "--max-restarts", "1"]) == 2  # resume is false
    assert "set train.resume=auto" in capsys.readouterr().err
    assert len(launched) == 1


def test_exports_are_readable_like_the_files_beside_them_and_keep_the_generation_config(
    runs, tmp_path, capfd
):
    # safetensors 0.8 writes through a private temp file: the exported weights came out 0600 while the
    # config and tokenizer beside them were 0644; and the base's generation_config.json was left behind
    import shutil

    base = tmp_path / "base"
    shutil.copytree(runs["model"], base)
    gen = {"bos_token_id": 1, "eos_token_id": [2, 3], "temperature": 0.6, "do_sample": True}
    (base / "generation_config.json").write_text(json.dumps(gen))
    umask = os.umask(0o022)
    try:
        hf, adapter = tmp_path / "hf", tmp_path / "adapter"
        args = ["--model", str(base)]
        assert main(["export", str(runs["lora"]), "--format", "hf", "--out", str(hf), *args]) == 0
        assert main(["export", str(runs["lora"]), "--format", "peft", "--out", str(adapter), *args]) == 0
    finally:
        os.umask(umask)
    capfd.readouterr()
    for f in (hf / "model.safetensors", hf / "config.json", adapter / "adapter_model.safetensors"):
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert json.loads((hf / "generation_config.json").read_text()) == gen
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(str(hf)).eos_token_id == [2, 3]
    # a base without one (or with one that is not a JSON object) exports without one
    (base / "generation_config.json").write_text("[1, 2]")
    out = tmp_path / "hf2"
    assert main(["export", str(runs["lora"]), "--format", "hf", "--out", str(out), *args]) == 0
    capfd.readouterr()
    assert not (out / "generation_config.json").exists()


def _read_only(monkeypatch, module, name):
    """Make `module.name` (a writer) fail as a read-only mount does: as root, chmod would not stop it."""
    import errno

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("fmt", ["hf", "peft", "gguf"])
def test_export_to_a_place_that_cannot_be_written_is_one_line(runs, tmp_path, capfd, monkeypatch, fmt):
    import snuggle.io.gguf_export as gguf_export
    import snuggle.io.hf as hf_io

    if fmt == "gguf":
        _read_only(monkeypatch, gguf_export, "GGUFWriter")
    else:
        _read_only(monkeypatch, hf_io, "save_file")
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "out")
    rc = main(["export", str(runs["lora"]), "--format", fmt, "--out", str(out)])
    assert_one_error_line(rc, *capfd.readouterr(), f"--out {out}: cannot write there (Read-only file system)")
    assert list(tmp_path.iterdir()) == []  # no half-written export, no temp left behind


def test_export_onto_a_file_says_it_is_a_file(runs, tmp_path, capfd):
    f = tmp_path / "afile"
    f.write_text("mine")
    rc = main(["export", str(runs["lora"]), "--format", "hf", "--out", str(f)])
    assert_one_error_line(rc, *capfd.readouterr(), f"--out {f} is a file")
    assert f.read_text() == "mine"


def test_an_output_dir_that_cannot_be_written_is_refused_before_the_model_loads(
    runs, tmp_path, capfd, monkeypatch
):
    # an existing directory on a read-only mount passed every check, then the model loaded and
    # writing metrics.jsonl raised OSError with a traceback
    import pathlib

    import snuggle.train.setup as setup_mod

    out = tmp_path / "ro"
    out.mkdir()
    touch = pathlib.Path.touch

    def touch_refused(self, *args, **kwargs):
        if self.parent == out:
            import errno

            raise OSError(errno.EROFS, "Read-only file system")
        return touch(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "touch", touch_refused)
    monkeypatch.setattr(setup_mod, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    overrides = [f"model.path={runs['model']}", f"data.train={runs['corpus']}", "train.steps=1"]
    rc = main(["train", str(write_empty(tmp_path)), *overrides, f"train.output_dir={out}"])
    assert_one_error_line(rc, *capfd.readouterr(), f"train.output_dir {out}: cannot write there")
    assert list(out.iterdir()) == []


def test_a_run_whose_latest_names_a_missing_checkpoint_says_which_one_to_use(runs, tmp_path, capfd):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run)
    newest = (run / "latest").read_text().strip()
    (run / "latest").write_text("checkpoint-0000099\n")
    rc = main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "x")])
    line = assert_one_error_line(rc, *capfd.readouterr(), "names no complete checkpoint while", newest)
    assert f"echo {newest} > {run / 'latest'}" in line
    (run / "latest").unlink()
    rc = main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "x")])
    assert_one_error_line(rc, *capfd.readouterr(), f"{run / 'latest'} is missing while")
