"""Hugging Face `datasets` directories (`save_to_disk`) as training data, for text and instruction records:
the same tokens as the same documents in JSONL, the token cache keyed by the dataset's fingerprint files,
DatasetDict splits, and one-line errors (including a missing `datasets` package)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny_tokenizer
from snuggle.config import load_config
from snuggle.data import resolve_files, tokenize_corpus
from snuggle.data.instruct import tokenize_instruct
from snuggle.errors import SnuggleError
from snuggle.load import load
from snuggle.train.setup import build_data

datasets = pytest.importorskip("datasets")

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    # datasets' progress bars and the multiprocess library's deprecations are not ours
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

DOCS = ["the cat sees a dog.", "the red bird sings.", "a big fish eats.", "the old moon."] * 3
RECORDS = [
    {"instruction": "name a bird", "input": None, "output": "the blue bird", "messages": None},
    {"instruction": None, "input": None, "output": None, "messages": [
        {"role": "user", "content": "a dog?"}, {"role": "assistant", "content": "a red dog."}
    ]},
]  # fmt: skip


@pytest.fixture(autouse=True)
def quiet_datasets(monkeypatch):
    datasets.disable_progress_bars()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def save(ds, path: Path) -> Path:
    ds.save_to_disk(str(path))
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
    return path


def test_text_dataset_dir_tokenizes_like_jsonl(tmp_path):
    tok = build_tiny_tokenizer()
    ds_dir = save(datasets.Dataset.from_dict({"body": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "ds")
    ref = tokenize_corpus(
        [jsonl(tmp_path / "d.jsonl", [{"body": d} for d in DOCS])],
        tok,
        text_field="body",
        cache_dir=tmp_path / "c",
    )
    files = resolve_files(str(tmp_path / "ds"))
    assert files == [ds_dir.resolve()]  # the directory itself, not its Arrow files
    stream = tokenize_corpus(files, tok, text_field="body", cache_dir=tmp_path / "c")
    assert np.array_equal(stream.tokens, ref.tokens) and np.array_equal(stream.doc_starts, ref.doc_starts)

    # the cache is reused while the dataset is unchanged, and rebuilt when it is saved anew
    assert tokenize_corpus(files, tok, text_field="body", cache_dir=tmp_path / "c").path == stream.path
    save(datasets.Dataset.from_dict({"body": DOCS[:4], "n": list(range(4))}), tmp_path / "ds2")
    (tmp_path / "ds").rename(tmp_path / "old")
    (tmp_path / "ds2").rename(tmp_path / "ds")
    again = tokenize_corpus(files, tok, text_field="body", cache_dir=tmp_path / "c")
    assert again.path != stream.path and again.num_docs == 4

    # a directory holding datasets directories (and other files) finds each dataset once
    jsonl(tmp_path / "x.jsonl", [{"body": "a cat."}])
    found = resolve_files(str(tmp_path))
    assert (tmp_path / "ds").resolve() in found and (tmp_path / "old").resolve() in found
    assert not any(p.suffix == ".arrow" for p in found)


def test_instruct_dataset_dict_uses_the_split(tmp_path):
    tok = build_tiny_tokenizer()
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(RECORDS * 3),
            "validation": datasets.Dataset.from_list(RECORDS[:1]),
        }
    )
    ds_dir = save(dd, tmp_path / "dd")
    ref = tokenize_instruct([jsonl(tmp_path / "r.jsonl", RECORDS * 3)], tok, cache_dir=tmp_path / "c")
    stream = tokenize_instruct([ds_dir], tok, cache_dir=tmp_path / "c")  # default: train
    assert np.array_equal(stream.tokens, ref.tokens) and np.array_equal(stream.targets, ref.targets)
    val = tokenize_instruct([ds_dir], tok, cache_dir=tmp_path / "c", split="validation")
    assert val.num_examples == 1 and val.path != stream.path
    with pytest.raises(
        SnuggleError, match=r"dd: the dataset has no split 'test' \(splits: train, validation\)"
    ):
        tokenize_instruct([ds_dir], tok, cache_dir=tmp_path / "c", split="test")


def test_trainer_reads_dataset_dirs(tiny_hf_model, tmp_path):
    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    text_dir = save(
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS})}), tmp_path / "t"
    )
    rec_dir = save(datasets.Dataset.from_list(RECORDS * 4), tmp_path / "r")
    _, tok = load(model_dir)
    common = [f"model.path={model_dir}", f"data.cache_dir={tmp_path / 'c'}", "data.seq_len=16"]
    for extra in (
        [f"data.train={text_dir}"],
        [f"data.train={rec_dir}", "data.format=instruct", "data.seq_len=64"],
    ):
        cfg = load_config(None, [*common, *extra])
        data = build_data(cfg.data, tok, 0, 256)
        assert len(data.train_idx) > 0
        assert set(data.rows[0]) == {"input_ids", "labels", "position_ids", "doc_ids"}
    cfg = load_config(None, [*common, f"data.train={text_dir}", "data.split=validation"])
    with pytest.raises(SnuggleError, match="no split 'validation'.*set data.split"):
        build_data(cfg.data, tok, 0, 256)


def test_dataset_dir_errors(tmp_path, monkeypatch):
    tok = build_tiny_tokenizer()
    ds_dir = save(datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "ds")
    with pytest.raises(SnuggleError, match=r"ds: no column 'body' \(columns: text, n\)"):
        tokenize_corpus([ds_dir], tok, text_field="body", cache_dir=tmp_path / "c")
    with pytest.raises(SnuggleError, match="column 'n' must hold strings"):
        tokenize_corpus([ds_dir], tok, text_field="n", cache_dir=tmp_path / "c")
    with pytest.raises(SnuggleError, match="no 'messages' or 'instruction'/'output' columns"):
        tokenize_instruct([ds_dir], tok, cache_dir=tmp_path / "c")
    # an Arrow file gone: one line naming the directory
    next(ds_dir.glob("*.arrow")).unlink()
    with pytest.raises(SnuggleError, match="ds: unreadable datasets directory"):
        tokenize_corpus([ds_dir], tok, cache_dir=tmp_path / "c")
    # without the optional package: say what to install
    ok = save(datasets.Dataset.from_dict({"text": DOCS}), tmp_path / "ok")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SnuggleError, match="needs the 'datasets' package: pip install datasets"):
        tokenize_corpus([ok], tok, cache_dir=tmp_path / "c2")
    assert not any((tmp_path / "c2").glob("*/meta.json"))
