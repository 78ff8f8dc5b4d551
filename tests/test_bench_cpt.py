"""benchmarks/cpt.py and run.py's CPT suites: the recipe through snuggle's CLI and through HF + PEFT on a
tiny shape (the same curve from the same weights, factors and data), and what can be checked of the
peers' rows without a GPU (their environment, commands, and the table).

Parity tolerance on the CPU (fp32): 1e-5 relative per step (cpt.PARITY_RTOL; measured ~1e-7).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import cpt  # noqa: E402
import run  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _row(out: str) -> dict:
    return json.loads([ln for ln in out.splitlines() if ln.startswith('{"')][-1])


def _tiny(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--shape",
        "tiny",
        "--seq",
        "16",
        "--r",
        "4",
        "--quantize",
        "none",
        "--optim",
        "adamw",
        "--work",
        str(tmp_path / "work"),
        "--out-dir",
        str(tmp_path / "runs"),
        *extra,
    ]


def test_snuggle_cli_follows_hf_peft_for_20_steps_and_trains_the_embeddings(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the snuggle train subprocess, on a shared CPU
    # one optimizer step = all 16 documents, so the stacks' row orders cannot make the curves differ
    flags = _tiny(tmp_path, "--warmup", "0", "--steps", "20", "--docs", "16")
    init = tmp_path / "init"
    cpt.main(["--stack", "hf", *flags, "--save-init-adapter", str(init)])
    hf = _row(capsys.readouterr().out)
    cpt.main(["--stack", "snuggle", *flags, "--adapter", str(init)])
    ours = _row(capsys.readouterr().out)
    assert "error" not in hf and "error" not in ours, (hf, ours)
    assert len(ours["losses"]) == len(hf["losses"]) == 20
    verdict = cpt.compare_curves(ours, hf, cpt.PARITY_RTOL["fp32"])
    assert verdict["parity"], verdict
    assert ours["loss_last"] < ours["loss_first"] - 1e-3  # it trained, so the agreement means something
    for row in (ours, hf):
        assert set(row["embeddings_changed"]) == {"embed_tokens", "lm_head"}
        assert all(v > 0 for v in row["embeddings_changed"].values()), row["embeddings_changed"]
    assert not (tmp_path / "runs" / "snuggle-tiny-cap0").exists()  # the GBs of a real row are not kept


def test_curve_comparison_fails_on_a_different_curve_or_frozen_embeddings():
    moved = {"embed_tokens": 1e-4, "lm_head": 1e-4}
    ref = {"losses": [6.0, 5.9, 5.8], "embeddings_changed": moved}
    assert cpt.compare_curves({"losses": [6.0, 5.9, 5.8], "embeddings_changed": moved}, ref, 1e-5)["parity"]
    off = cpt.compare_curves({"losses": [6.0, 5.9, 5.81], "embeddings_changed": moved}, ref, 1e-5)
    assert not off["parity"] and off["max_rel_diff"] == pytest.approx(0.01 / 5.8)
    frozen = {"embed_tokens": 1e-4, "lm_head": 0.0}
    assert not cpt.compare_curves({"losses": ref["losses"], "embeddings_changed": frozen}, ref, 1e-5)[
        "parity"
    ]
    assert not cpt.compare_curves({"losses": ref["losses"][:2], "embeddings_changed": moved}, ref, 1)[
        "parity"
    ]


def test_documents_are_exactly_one_row_of_the_exact_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    model_dir, corpus = cpt.prepare("tiny", tmp_path, seq=16, docs=5)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert len(tok) == cpt.SHAPES["tiny"]["vocab_size"]
    docs = [json.loads(ln)["text"] for ln in corpus.read_text().splitlines()]
    assert len(docs) == 5
    for text in docs:
        ids = tok(text)["input_ids"]  # snuggle's path: the document, then its own EOS
        assert len(ids) == 15 and min(ids) >= 4 and tok.unk_token_id not in ids
        peer = tok(text + " " + tok.eos_token)["input_ids"]  # the notebook's: the EOS text appended
        assert peer == ids + [tok.eos_token_id]


def test_snuggle_config_is_the_recipe_and_a_valid_config(tmp_path):
    from snuggle.config import config_from_dict

    a = cpt.parse_args(["--stack", "snuggle", "--shape", "llama3-8b", "--cap", "24"])
    cfg = config_from_dict(cpt.snuggle_config(a, tmp_path / "m", tmp_path / "c.jsonl", tmp_path / "o"))
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.rslora, cfg.lora.dropout) == (128, 32.0, True, 0.0)
    assert cfg.lora.train_embeddings and cfg.model.quantize == "nf4"
    t = cfg.train
    assert (t.lr, t.embedding_lr, t.weight_decay, t.warmup_steps, t.schedule) == (
        5e-5,
        1e-5,
        0.01,
        10,
        "linear",
    )
    assert (t.batch_size, t.grad_accum, cfg.data.seq_len, t.optimizer) == (2, 8, 2048, "adamw8bit")
    assert t.memory_budget_gib == 24 and t.embedding_offload == "auto"
    assert a.docs == (a.warmup + a.steps) * 16  # one document per row trained: no row seen twice


def test_each_stack_gets_its_own_environment(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setenv("UNSLOTH_RETURN_LOGITS", "1")
    for stack in ("snuggle", "hf", "unsloth"):
        env = cpt.stack_env(stack)
        assert "PYTORCH_CUDA_ALLOC_CONF" not in env and "UNSLOTH_RETURN_LOGITS" not in env
    assert cpt.stack_env("unsloth-logits")["UNSLOTH_RETURN_LOGITS"] == "1"
    assert cpt.stack_env("unsloth", "auto")["UNSLOTH_GC_KEEP_LAYERS"] == "auto"
    assert "UNSLOTH_GC_KEEP_LAYERS" not in cpt.stack_env("hf", "auto")


def test_cpt_suites_cover_the_recipe_and_parity_hands_hf_factors_to_snuggle(tmp_path):
    cases = run.CPT_SUITES["cpt"]
    for shape in ("mistral7b", "llama3-8b"):
        for cap in (0, 24):
            stacks = {(c[0], c[3]) for c in cases if c[1] == shape and c[2] == cap}
            assert {s for s, _ in stacks} == set(cpt.STACKS)
            assert ("unsloth-logits", ("--keep-layers", "auto")) in stacks
    for stack, shape, _, extra in [c for cases in run.CPT_SUITES.values() for c in cases]:
        cmd, env, _ = run.cpt_command((stack, shape, 0, extra), tmp_path)
        a = cpt.parse_args(cmd[2:])  # every case's flags parse
        assert (a.stack, a.shape) == (stack, shape)
    hf, _, name = run.cpt_command(("hf", "tiny", 0, ("--parity", "bf16")), tmp_path)
    ours, _, _ = run.cpt_command(("snuggle", "tiny", 0, ("--parity", "bf16")), tmp_path)
    init = str(tmp_path / "init-tiny-bf16")
    assert name == "bf16" and hf[hf.index("--save-init-adapter") + 1] == init
    assert ours[ours.index("--adapter") + 1] == init
    _, env, _ = run.cpt_command(("unsloth", "mistral7b", 24, ("--keep-layers", "auto")), tmp_path)
    assert env["UNSLOTH_GC_KEEP_LAYERS"] == "auto"
    picked = run.cpt_cases(["cpt"], "unsloth,llama3-8b")
    assert len(picked) == 4 and {(c[0], c[1]) for c in picked} == {("unsloth", "llama3-8b")}
    assert run.cpt_cases(["cpt", "cpt-offload"]) == cases + run.CPT_SUITES["cpt-offload"]


def test_cpt_table_carries_rows_errors_and_the_parity_verdict(tmp_path, capsys):
    def row(stack, losses, **kw):
        return dict(
            stack=stack,
            shape="llama3-8b",
            cap_gib=0,
            step_s=4.0,
            tokens_per_s=8192.0,
            peak_gib=20.5,
            loss_first=losses[0],
            loss_last=losses[-1],
            wall_150_s=600.0,
            losses=losses,
            embeddings_changed={"embed_tokens": 1e-5, "lm_head": 1e-5},
            **kw,
        )

    rows = [
        row("hf", [11.8, 11.7], parity_run="bf16"),
        row("snuggle", [11.8, 11.701], parity_run="bf16", placement="snuggle: embed_tokens/lm_head x"),
        {"stack": "unsloth", "shape": "llama3-8b", "cap_gib": 24, "error": "out of memory"},
    ]
    env = {"gpu": "NVIDIA H100", "commit": "abc1234", "torch": "2.11"}
    run.write_cpt_tables("cpt-parity", env, run.with_parity(rows, env), tmp_path)
    assert rows[1]["parity"] and rows[1]["max_rel_diff"] == pytest.approx(0.001 / 11.7)
    text = (tmp_path / "cpt-parity-NVIDIA_H100-abc1234.md").read_text()
    assert "| llama3-8b snuggle (parity, bf16) | 4.00 | 8,192 | 20.5 | 11.8000 | 11.7010 | 10.0 min |" in text
    assert "curve equal to HF's" in text and "embed_tokens/lm_head x" in text
    assert "| llama3-8b unsloth, cap 24 GiB | out of memory |" in text
    lines = (tmp_path / "cpt-parity-NVIDIA_H100-abc1234.jsonl").read_text().splitlines()
    assert [json.loads(ln)["stack"] for ln in lines] == ["hf", "snuggle", "unsloth"]
    assert "commit abc1234" in capsys.readouterr().out
