"""snuggle.data.instruct: which tokens are targets, packing without cross-example attention, the cache,
and one-line errors that name the file and line."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

import snuggle
from conftest import build_tiny_tokenizer
from snuggle.data import BatchPlan, collate, iterate_eval, split_indices
from snuggle.data.instruct import FALLBACK_TEMPLATE, InstructStream, PackedExamples, tokenize_instruct
from snuggle.data.packing import IGNORE_INDEX
from snuggle.errors import SnuggleError

pytestmark = pytest.mark.usefixtures("single_thread")

# ChatML-like. The tiny tokenizer has no "\n" (it drops characters outside its alphabet), so turns are
# separated by a space, which must not be a target after <|im_end|>.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
# A different, terminator-free format: replies end with no special token, so EOS closes them.
PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}.{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"  # noqa: E501

ALPACA = [
    {"instruction": "name a bird", "output": "the blue bird"},
    {"instruction": "name a cat", "input": "a big one", "output": "the big cat"},
]
CHAT = {
    "messages": [
        {"role": "system", "content": "be small"},
        {"role": "user", "content": "a dog?"},
        {"role": "assistant", "content": "a red dog."},
        {"role": "user", "content": "and a fish?"},
        {"role": "assistant", "content": "a green fish!"},
    ]
}


@pytest.fixture
def tok():
    t = build_tiny_tokenizer()
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return t


def _jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _examples(stream: InstructStream) -> list[tuple[list[int], list[int]]]:
    """(tokens, target flags) of every example."""
    bounds = [*stream.example_starts.tolist(), len(stream)]
    return [
        (stream.tokens[a:b].astype(int).tolist(), stream.targets[a:b].astype(int).tolist())
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def _targets(stream: InstructStream) -> list[list[int]]:
    return [[t for t, m in zip(ids, mask, strict=True) if m] for ids, mask in _examples(stream)]


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


# --- what is a target -------------------------------------------------------------------------------------


def test_alpaca_with_chatml_template(tok, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "a.jsonl", ALPACA)
    stream = tokenize_instruct(data, tok, cache_dir=tmp_path / "cache", chat_template=CHATML)
    end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    assert stream.num_examples == 2
    # exactly the reply and the <|im_end|> that closes it; not the space after it; EOS closes the example
    # and is not a target because it follows that (non-target) space. The reply's first token fuses the
    # template's separator space with its first word ("Ġthe"): it overlaps the reply, so it is a target.
    assert _targets(stream) == [_ids(tok, " the blue bird") + [end], _ids(tok, " the big cat") + [end]]
    for (ids, mask), rec in zip(_examples(stream), ALPACA, strict=True):
        user = rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
        rendered = tok.apply_chat_template(msgs, chat_template=CHATML, tokenize=False)
        assert ids == _ids(tok, rendered) + [eos] and mask[-2:] == [0, 0]
        assert tok.decode(ids[: mask.index(1)]).endswith("<|im_start|>assistant")  # the prompt is context


def test_eos_after_a_special_end_of_turn_is_no_target(tok, tmp_path: Path) -> None:
    """Llama 3 closes a reply with <|eot_id|> (a target) and has another EOS: the EOS appended after it
    used to be trained too, where ChatML's (after its newline) was not; generation stops at the end of
    turn, so neither is a target."""
    llama3 = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )  # no whitespace after the end of turn, as Llama 3's template
    stream = tokenize_instruct(
        _jsonl(tmp_path / "a.jsonl", ALPACA), tok, cache_dir=tmp_path / "c", chat_template=llama3
    )
    end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    assert end != eos
    for ids, mask in _examples(stream):
        assert ids[-2:] == [end, eos] and mask[-2:] == [1, 0]
    assert _targets(stream) == [_ids(tok, " the blue bird") + [end], _ids(tok, " the big cat") + [end]]


def test_a_template_ignoring_the_generation_prompt_does_not_train_its_header(tok, tmp_path: Path) -> None:
    """A ChatML template without an add_generation_prompt branch renders `<|im_start|>assistant` as part
    of the reply's turn: it was trained on as if the model should say it. It is context, with a warning
    that prompts at generate time will lack it."""
    no_prompt = "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    data = _jsonl(tmp_path / "a.jsonl", ALPACA)
    with pytest.warns(UserWarning, match="ignores add_generation_prompt.*<\\|im_start\\|>assistant"):
        stream = tokenize_instruct(data, tok, cache_dir=tmp_path / "c", chat_template=no_prompt)
    proper = tokenize_instruct(data, tok, cache_dir=tmp_path / "c", chat_template=CHATML)
    assert _examples(stream) == _examples(proper)  # same tokens, same targets as with the prompt branch
    # a template without any header before replies is left as it was: the whole reply is the target
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bare = "{% for m in messages %}{{ m['content'] }}.{% endfor %}"
        plain = tokenize_instruct(data, tok, cache_dir=tmp_path / "c", chat_template=bare)
    assert _targets(plain)[0] == _ids(tok, "the blue bird.") + [tok.eos_token_id]


def test_multi_turn_chat_and_tokenizer_template(tok, tmp_path: Path) -> None:
    tok.chat_template = CHATML  # the tokenizer's own template is used when none is passed
    data = _jsonl(tmp_path / "c.jsonl", [CHAT])
    stream = tokenize_instruct(data, tok, cache_dir=tmp_path / "cache")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert _targets(stream) == [_ids(tok, " a red dog.") + [end] + _ids(tok, " a green fish!") + [end]]
    ids, mask = _examples(stream)[0]
    text = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    for prompt_part in ("system", "be small", "user", "a dog?", "and a fish?", "assistant"):
        assert prompt_part in text  # system, user and the headers are all context, never targets

    # an explicit template overrides the tokenizer's (and is another cache)
    other = tokenize_instruct(data, tok, cache_dir=tmp_path / "cache", chat_template=PLAIN)
    assert other.path != stream.path
    eos = tok.eos_token_id
    # PLAIN closes a reply with "." and nothing special: the reply runs to the next turn, EOS is a target
    assert _targets(other) == [_ids(tok, " a red dog..") + _ids(tok, " a green fish!.") + [eos]]


def test_fallback_template(tok, tmp_path: Path) -> None:
    assert tok.chat_template is None
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a bird\n\nblue"},
        {"role": "assistant", "content": "A jay."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "A tit."},
    ]
    assert tok.apply_chat_template(msgs, chat_template=FALLBACK_TEMPLATE, tokenize=False) == (
        "Be brief.\n\n### Instruction:\nName a bird\n\nblue\n\n### Response:\nA jay.</s>"
        "\n\n### Instruction:\nAnother?\n\n### Response:\nA tit.</s>"
    )
    data = _jsonl(tmp_path / "a.jsonl", [*ALPACA, CHAT])
    stream = tokenize_instruct(data, tok, cache_dir=tmp_path / "cache")
    eos = tok.eos_token_id
    assert _targets(stream) == [
        _ids(tok, "the blue bird") + [eos],
        _ids(tok, "the big cat") + [eos],
        _ids(tok, "a red dog.") + [eos] + _ids(tok, "a green fish!") + [eos],
    ]
    # the fallback closes every reply with EOS itself, so none is appended after it
    assert [ids.count(eos) for ids, _ in _examples(stream)] == [1, 1, 2]
    assert all(ids[-1] == eos for ids, _ in _examples(stream))
    # BOS is added the way the tokenizer adds it to plain text (this one does not)
    assert _examples(stream)[0][0][0] != tok.bos_token_id


def test_labels_are_next_token_targets(tok, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [*ALPACA, CHAT] * 3)
    stream = tokenize_instruct(data, tok, cache_dir=tmp_path / "cache", chat_template=CHATML)
    rows = PackedExamples(stream, 96)
    flat = []
    for i in range(len(rows)):
        row = rows[i]
        ids, labels, doc = row["input_ids"], row["labels"], row["doc_ids"]
        valid = labels != IGNORE_INDEX
        # a label is the next input token of the same example, and only where that token is a target
        assert torch.equal(labels[:-1][valid[:-1]], ids[1:][valid[:-1]])
        assert bool((doc[1:][valid[:-1]] == doc[:-1][valid[:-1]]).all())
        flat.append(labels[valid])
    per_example = [torch.tensor(t) for t in _targets(stream)]
    assert torch.equal(torch.cat(flat), torch.cat(per_example))  # every target exactly once, in order


# --- packing ----------------------------------------------------------------------------------------------


def test_packing_isolates_examples(tiny_hf_model, tok, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [*ALPACA, CHAT, *ALPACA])
    stream = tokenize_instruct(data, tok, cache_dir=tmp_path / "cache", chat_template=CHATML)
    rows = PackedExamples(stream, 96)
    assert len(rows) < stream.num_examples and rows.num_truncated == 0 and 0.5 < rows.fill <= 1.0
    model, _ = snuggle.load(tiny_hf_model("llama", True, tmp_path)[0], with_tokenizer=False)
    examples = iter(_examples(stream))
    seen = 0
    for i in range(len(rows)):
        row = rows[i]
        doc, pos = row["doc_ids"], row["position_ids"]
        with torch.no_grad():
            packed = model(row["input_ids"][None], pos[None], doc[None])[0]
        for d in doc.unique().tolist():
            where = (doc == d).nonzero().flatten()
            if set(row["input_ids"][where].tolist()) == {stream.eos_id}:
                continue  # padding (a real example always has prompt tokens)
            ids, _ = next(examples)
            seen += 1
            assert row["input_ids"][where].tolist() == ids and pos[where].tolist() == list(range(len(ids)))
            with torch.no_grad():
                alone = model(torch.tensor([ids]))[0]
            # same logits as the example alone: nothing leaks in from its neighbours
            torch.testing.assert_close(packed[where], alone, rtol=0, atol=1e-5)
    assert seen == stream.num_examples


def test_truncation_never_splits(tok, tmp_path: Path) -> None:
    long = {"instruction": "name many birds", "output": " ".join(["the blue bird"] * 30)}
    data = _jsonl(tmp_path / "t.jsonl", [ALPACA[0], long, ALPACA[1]])
    stream = tokenize_instruct(data, tok, cache_dir=tmp_path / "cache", chat_template=CHATML)
    lengths = np.diff([*stream.example_starts.tolist(), len(stream)])
    T = 70
    assert lengths[1] > T and lengths[0] + lengths[2] <= T
    with pytest.warns(UserWarning, match="1 of 3 instruction examples are longer than seq_len=70"):
        rows = PackedExamples(stream, T)
    assert rows.num_truncated == 1 and len(rows) == 3  # [ex0] [ex1 cut] [ex2]: ex2 does not join ex0's row
    cut = rows[1]
    start = int(stream.example_starts[1])
    assert cut["input_ids"].tolist() == stream.tokens[start : start + T].astype(int).tolist()
    assert set(cut["doc_ids"].tolist()) == {0} and cut["position_ids"].tolist() == list(range(T))
    # the last position still predicts the example's next (target) token
    assert cut["labels"][-1].item() == int(stream.tokens[start + T]) and stream.targets[start + T] == 1
    for i in (0, 2):
        assert rows[i]["position_ids"][0] == 0 and rows[i]["labels"][-1] == IGNORE_INDEX
    with pytest.raises(SnuggleError, match="seq_len must be >= 2"):
        PackedExamples(stream, 1)


def test_an_example_whose_prompt_fills_the_row_is_left_out(tok, tmp_path: Path) -> None:
    # the prompt alone is longer than seq_len: cut to seq_len, its row held no target at all, and a step
    # of such rows logged loss 0.0 over 0 tokens while AdamW's momentum still moved the parameters
    long_prompt = {"instruction": " ".join(["the blue bird"] * 30), "output": "a cat"}
    long_reply = {"instruction": "name many birds", "output": " ".join(["the blue bird"] * 30)}
    data = _jsonl(tmp_path / "t.jsonl", [ALPACA[0], long_prompt, long_reply, ALPACA[1]])
    stream = tokenize_instruct(data, tok, cache_dir=tmp_path / "cache", chat_template=CHATML)
    T = 70
    assert np.diff([*stream.example_starts.tolist(), len(stream)])[1] > T
    with pytest.warns(UserWarning, match="1 of 4 instruction examples have no reply token within"):
        rows = PackedExamples(stream, T)
    assert rows.num_dropped == 1 and rows.num_truncated == 1  # the long reply still trains, cut
    assert all(bool((rows[i]["labels"] != IGNORE_INDEX).any()) for i in range(len(rows)))
    starts = {int(stream.example_starts[e]) for e in (0, 2, 3)}
    assert {int(r) for r in rows._row_start} <= starts and int(
        stream.example_starts[1]
    ) not in rows._row_start
    only = _jsonl(tmp_path / "only.jsonl", [long_prompt])
    stream = tokenize_instruct(only, tok, cache_dir=tmp_path / "cache", chat_template=CHATML)
    with pytest.raises(SnuggleError, match="none of the 1 instruction examples has a reply token"):
        PackedExamples(stream, T)


def test_loader_and_loss_work_unchanged(tiny_hf_model, tok, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [*ALPACA, CHAT] * 4)
    stream = tokenize_instruct(data, tok, cache_dir=tmp_path / "cache", chat_template=CHATML)
    rows = PackedExamples(stream, 96)
    train, val = split_indices(len(rows), 0.2, seed=0)
    plan = BatchPlan(train, batch_size=2, grad_accum=1, seed=0)
    batch = rows.batch(plan.micro_batches(0)[0])
    assert {k: tuple(v.shape) for k, v in batch.items()} == dict.fromkeys(batch, (2, 96))
    assert all(v.dtype == torch.int64 for v in batch.values())
    assert torch.equal(collate([rows[0], rows[1]])["labels"], rows.batch([0, 1])["labels"])
    assert sum(b["input_ids"].shape[0] for b in iterate_eval(rows, val, batch_size=1)) == len(val)
    model, _ = snuggle.load(tiny_hf_model("qwen2", False, tmp_path)[0], with_tokenizer=False)
    loss = model.loss_sum(**batch) / (batch["labels"] != IGNORE_INDEX).sum()
    assert torch.isfinite(loss) and loss > 0


# --- the cache and the input formats ----------------------------------------------------------------------


def test_compressed_jsonl_reads_as_the_plain_file(tok, tmp_path: Path) -> None:
    import gzip

    plain = _jsonl(tmp_path / "a.jsonl", ALPACA)
    packed = tmp_path / "a.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    a = tokenize_instruct(plain, tok, cache_dir=tmp_path / "cache", chat_template=CHATML)
    b = tokenize_instruct(packed, tok, cache_dir=tmp_path / "cache", chat_template=CHATML)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.targets, b.targets)


def test_cache_reuse_and_invalidation(tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _jsonl(tmp_path / "a.jsonl", ALPACA)
    stat = data.stat()
    cache = tmp_path / "cache"
    first = tokenize_instruct(data, tok, cache_dir=cache, chat_template=CHATML)
    import snuggle.data.instruct as instruct

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("re-tokenized although the cache is complete")

    monkeypatch.setattr(instruct, "_write_cache", boom)
    again = tokenize_instruct(str(data), tok, cache_dir=cache, chat_template=CHATML)
    assert again.path == first.path and np.array_equal(again.tokens, first.tokens)
    assert json.loads((first.path / "meta.json").read_text())["num_target_tokens"] == sum(first.targets)
    monkeypatch.undo()

    other_template = tokenize_instruct(data, tok, cache_dir=cache, chat_template=PLAIN)
    fallback = tokenize_instruct(data, tok, cache_dir=cache)
    expected = np.array(first.targets)
    (first.path / "targets.u8").unlink()  # a damaged cache is rebuilt, not trusted
    rebuilt = tokenize_instruct(data, tok, cache_dir=cache, chat_template=CHATML)
    assert rebuilt.path == first.path and (rebuilt.path / "targets.u8").stat().st_size == len(rebuilt)
    assert np.array_equal(rebuilt.targets, expected)
    _jsonl(data, [*ALPACA, ALPACA[0]])  # the file changed
    changed = tokenize_instruct(data, tok, cache_dir=cache, chat_template=CHATML)
    assert len({first.path, other_template.path, fallback.path, changed.path}) == 4
    assert changed.num_examples == 3
    _jsonl(data, ALPACA)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime as the first call saw them
    restored = tokenize_instruct(data, tok, cache_dir=cache, chat_template=CHATML)
    assert restored.path != first.path  # a rewritten file is not taken for the old one (inode, ctime)
    assert np.array_equal(restored.targets, expected)

    import pickle

    assert np.array_equal(pickle.loads(pickle.dumps(rebuilt)).targets, rebuilt.targets)


def test_json_and_parquet_inputs(tok, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    js = tmp_path / "a.json"
    js.write_text(json.dumps([*ALPACA, CHAT], indent=2), encoding="utf-8")
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"data": ALPACA}), encoding="utf-8")
    pa_alpaca = tmp_path / "a.parquet"
    # from_pylist takes its columns from the first row; 'input' is null where a record has none
    pq.write_table(pa.Table.from_pylist([{**ALPACA[0], "input": None}, ALPACA[1]]), pa_alpaca)
    pa_chat = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT]), pa_chat)
    ref = tokenize_instruct(_jsonl(tmp_path / "r.jsonl", [*ALPACA, CHAT]), tok, cache_dir=tmp_path / "c")
    got = tokenize_instruct([js, wrapped, pa_alpaca, pa_chat], tok, cache_dir=tmp_path / "c")
    alpaca, chat = _examples(ref)[:2], _examples(ref)[2:]
    assert _examples(got) == alpaca + chat + alpaca + alpaca + chat


# --- errors -----------------------------------------------------------------------------------------------


BAD = [
    ({"instruction": "a cat"}, "Alpaca record is missing 'output'"),
    ({"instruction": "a cat", "output": "  "}, "empty 'output'"),
    ({"instruction": 3, "output": "a"}, "field 'instruction' must be a string, got int"),
    ({"messages": []}, "empty 'messages'"),
    ({"messages": "hi"}, "'messages' must be a list"),
    ({"messages": [{"role": "bot", "content": "a"}]}, "message 0 has unknown role 'bot'"),
    ({"messages": [{"role": "user"}]}, "message 0 must be an object with 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant message"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "message 0 is an assistant message with no user"),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 1}]},
        "message 1 content must be a string",
    ),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
        "message 1 is an empty assistant message",
    ),
    ({"messages": [], "output": "a"}, "record has both 'messages' and Alpaca fields"),
    ({"text": "a cat"}, r"expected 'messages' or 'instruction' \+ 'output' fields \(fields present: text\)"),
    (["a"], "expected a JSON object"),
]


@pytest.mark.parametrize(("record", "message"), BAD)
def test_malformed_records_name_file_and_line(tok, tmp_path: Path, record: Any, message: str) -> None:
    data = _jsonl(tmp_path / "bad.jsonl", [ALPACA[0], record])
    with pytest.raises(SnuggleError, match=f"bad.jsonl:2: {message}"):
        tokenize_instruct(data, tok, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # nothing left behind


def test_file_level_errors(tok, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    broken = tmp_path / "b.jsonl"
    broken.write_text(json.dumps(ALPACA[0]) + "\n\n{not json\n")
    with pytest.raises(SnuggleError, match="b.jsonl:3: malformed JSON"):
        tokenize_instruct(broken, tok, cache_dir=cache)
    js = tmp_path / "a.json"
    js.write_text("[\n" + json.dumps(ALPACA[0]) + ",\n\n" + json.dumps({"instruction": "a"}) + "\n]")
    with pytest.raises(SnuggleError, match="a.json:4: Alpaca record is missing 'output'"):
        tokenize_instruct(js, tok, cache_dir=cache)
    js.write_text("[\n" + json.dumps(ALPACA[0]) + "\n" + json.dumps(ALPACA[1]) + "]")
    with pytest.raises(SnuggleError, match="a.json:3: malformed JSON: expected ',' or ']'"):
        tokenize_instruct(js, tok, cache_dir=cache)
    pq_file = tmp_path / "p.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([ALPACA[0], {"instruction": "a cat", "output": ""}]), pq_file)
    with pytest.raises(SnuggleError, match="p.parquet: row 1: empty 'output'"):
        tokenize_instruct(pq_file, tok, cache_dir=cache)
    txt = tmp_path / "a.txt"
    txt.write_text("the cat")
    with pytest.raises(SnuggleError, match=r"unsupported instruction data file type '\.txt'"):
        tokenize_instruct(txt, tok, cache_dir=cache)
    empty = _jsonl(tmp_path / "e.jsonl", [])
    with pytest.raises(SnuggleError, match="no instruction records in 1 file"):
        tokenize_instruct(empty, tok, cache_dir=cache)


def test_a_directory_of_instruction_data_passes_over_its_text_files(tok, tmp_path: Path) -> None:
    # a dataset folder with a README.txt beside its records was refused ("unsupported ... '.txt'")
    from snuggle.config import DataConfig
    from snuggle.train.setup import build_data

    d = tmp_path / "sft"
    d.mkdir()
    _jsonl(d / "train.jsonl", ALPACA)
    (d / "README.txt").write_text("where these records come from")
    dc = DataConfig(train=str(d), format="instruct", seq_len=64, val_fraction=0.0, chat_template=CHATML)
    dc.cache_dir = str(tmp_path / "cache")
    data = build_data(dc, tok, seed=0, max_positions=256)
    direct = tokenize_instruct(d / "train.jsonl", tok, cache_dir=tmp_path / "cache", chat_template=CHATML)
    assert len(data.rows) >= 1 and data.rows.stream.num_examples == direct.num_examples == len(ALPACA)
    (d / "train.jsonl").unlink()
    with pytest.raises(SnuggleError, match=r"no training files \(\.jsonl, \.json, \.parquet\)"):
        build_data(dc, tok, seed=0, max_positions=256)


def test_template_errors_name_the_record(tok, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "c.jsonl", [CHAT])
    raising = "{% if messages|length > 3 %}{{ raise_exception('too long') }}{% endif %}" + CHATML
    with pytest.raises(
        SnuggleError, match="c.jsonl:1: the chat template cannot render this record.*too long"
    ):
        tokenize_instruct(data, tok, cache_dir=tmp_path / "cache", chat_template=raising)
    # a template that renders earlier replies differently once more turns follow (as Qwen3's drops old
    # reasoning) has no stable reply spans: refused rather than mislabelled
    unstable = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}old{% else %}"
        "{{ m['content'] }}{% endif %}<|im_end|>{% endfor %}"
    )
    with pytest.raises(SnuggleError, match="c.jsonl:1: the chat template is not prefix-stable at message 2"):
        tokenize_instruct(data, tok, cache_dir=tmp_path / "cache", chat_template=unstable)


# --- a real chat template ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_template(smollm: Path, tmp_path: Path) -> None:
    """SmolLM2's ChatML template adds a default system prompt and a newline after <|im_end|>."""
    path = smollm
    from snuggle.io.gguf import load_gguf_tokenizer

    tok = load_gguf_tokenizer(path)
    data = _jsonl(tmp_path / "d.jsonl", [*ALPACA, CHAT])
    stream = tokenize_instruct(data, tok, cache_dir=tmp_path / "cache")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end == tok.eos_token_id
    assert _targets(stream) == [
        _ids(tok, "the blue bird") + [end],
        _ids(tok, "the big cat") + [end],
        _ids(tok, "a red dog.") + [end] + _ids(tok, "a green fish!") + [end],
    ]
    ids, mask = _examples(stream)[0]
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    # the template already closes with its EOS (<|im_end|>, then "\n"): no second EOS, "\n" no target
    assert text.endswith("the blue bird<|im_end|>\n") and mask[-2:] == [1, 0]


# --- snuggle eval --format instruct -----------------------------------------------------------------------


def test_eval_scores_the_replies_as_training_does(tiny_hf_model, tok, tmp_path: Path, capfd) -> None:
    from snuggle.cli import main

    model_dir, _ = tiny_hf_model("llama", True, tmp_path)
    tok.chat_template = CHATML
    tok.save_pretrained(model_dir)  # the model's tokenizer: special tokens and the template
    data = _jsonl(tmp_path / "held.jsonl", [*ALPACA, CHAT])
    args = ["eval", "--model", str(model_dir), "--data", str(data), "--seq-len", "128"]
    assert main([*args, "--format", "instruct", "--cache-dir", str(tmp_path / "c1")]) == 0
    res = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    # the oracle: each example alone (no packing), its loss over the targets tokenize_instruct marks
    stream = tokenize_instruct(data, tok, cache_dir=tmp_path / "c2")
    model, _ = snuggle.load(model_dir, with_tokenizer=False)
    total, n = 0.0, 0
    with torch.no_grad():
        for ids, mask in _examples(stream):
            x = torch.tensor([ids])
            labels = torch.full_like(x, IGNORE_INDEX)
            nxt = torch.tensor(mask[1:], dtype=torch.bool)
            labels[0, :-1][nxt] = x[0, 1:][nxt]
            total += float(model.loss_sum(x, labels))
            n += int(nxt.sum())
    assert res["format"] == "instruct" and res["tokens"] == n == sum(len(t) for t in _targets(stream))
    assert res["loss"] == pytest.approx(total / n, rel=1e-5)
    # the same records as text: every token scored, a different figure
    capfd.readouterr()
    text = _jsonl(tmp_path / "held-text.jsonl", [{"text": "the blue bird and the big cat"}])
    # no --seq-len: the default 2048 is capped at this model's 256 positions instead of refused
    cache = str(tmp_path / "c3")
    assert main(["eval", "--model", str(model_dir), "--data", str(text), "--cache-dir", cache]) == 0
    assert json.loads(capfd.readouterr().out.strip().splitlines()[-1])["format"] == "text"


def test_eval_takes_the_format_and_template_of_an_instruct_run(tmp_path: Path) -> None:
    from snuggle.api import _eval_format

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        json.dumps(
            {
                "model": {"path": str(tmp_path)},
                "data": {"train": str(tmp_path / "d.jsonl"), "format": "instruct", "chat_template": PLAIN},
            }
        )
    )
    assert _eval_format(None, str(run)) == ("instruct", PLAIN)
    assert _eval_format("text", str(run)) == ("text", PLAIN)
    assert _eval_format(None, None) == ("text", None)
    assert _eval_format("instruct", None) == ("instruct", None)  # the tokenizer's template, as in training
