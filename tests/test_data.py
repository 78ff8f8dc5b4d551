"""Fast CPU tests of snuggle.data: sources, token cache, packing, split and batch plan."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from snuggle.data import (
    IGNORE_INDEX,
    BatchPlan,
    PackedRows,
    TokenStream,
    collate,
    iter_document_pieces,
    iter_documents,
    iter_text_pieces,
    iterate_eval,
    resolve_files,
    split_indices,
    tokenize_corpus,
)
from snuggle.errors import SnuggleError

WORDS = [f"w{i}" for i in range(300)] + ["the", "cat", "sat", "on", "mat", "é", "ü", "🙂", ".", ","]
UNK, BOS, EOS = 0, 1, 2


class CountingTokenizer(PreTrainedTokenizerFast):
    """A real fast tokenizer that records every batch it is asked to encode."""

    calls: list[list[str]]

    def __call__(self, text, *args, **kwargs):
        self.calls.append(list(text))
        return super().__call__(text, *args, **kwargs)


def make_tokenizer() -> CountingTokenizer:
    # WordLevel + whitespace splitting: ids are predictable (w{i} -> i + 3) and independent of where a
    # text is cut at a line boundary, which the streaming tests rely on.
    vocab = {"[UNK]": UNK, "<s>": BOS, "</s>": EOS} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    hf = CountingTokenizer(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    hf.calls = []
    return hf


@pytest.fixture
def tokenizer() -> CountingTokenizer:
    return make_tokenizer()


def ids(text: str) -> list[int]:
    return [WORDS.index(w) + 3 for w in text.split()]


def write(path, content: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def write_jsonl(path, rows: list) -> str:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- sources


def test_resolve_dirs_globs_dedup(tmp_path, monkeypatch):
    a = write(tmp_path / "c" / "a.txt", "w1")
    b = write(tmp_path / "c" / "sub" / "b.jsonl", '{"text": "w2"}\n')
    write(tmp_path / "c" / "notes.md", "ignored inside a directory")
    write(tmp_path / "c" / ".cache" / "x.txt", "hidden folders are skipped")
    c = write(tmp_path / "c" / "sub" / "deep" / "c.parquet", b"")
    d = write(tmp_path / "d.json", "[]")

    # files a directory holds that are not training data are skipped, and counted in a warning
    with pytest.warns(UserWarning, match=r"1 files are not training data and were skipped \(1 \.md\)"):
        got = resolve_files(str(tmp_path / "c"))
    assert [str(p) for p in got] == sorted([a, b, c])
    write(tmp_path / "c" / "ls.1.gz", b"")
    write(tmp_path / "c" / "sub" / "guide.html", "")
    write(tmp_path / "c" / "sub" / "index.html", "")
    with pytest.warns(
        UserWarning, match=r"4 files .* skipped \(2 \.html, 1 \.md, 1 \.1\.gz\); read are \.txt"
    ):
        assert [str(p) for p in resolve_files(str(tmp_path / "c"))] == sorted([a, b, c])
    monkeypatch.chdir(tmp_path)
    assert resolve_files("c/*.txt") == [tmp_path.resolve() / "c" / "a.txt"]
    assert resolve_files("c/**/*.jsonl") == [tmp_path.resolve() / "c" / "sub" / "b.jsonl"]
    both = resolve_files(["d.json", "c", a, "c/**/*.txt"])  # duplicates collapse, order is sorted
    assert [str(p) for p in both] == sorted([a, b, c, d])
    assert resolve_files(["d.json", "c"]) == resolve_files(["c", str(tmp_path / "d.json")])


_ROFF = (
    ".TH LS 1\n.SH NAME\nls \\- Verzeichnisinhalte auflisten\n.SH BESCHREIBUNG\n\\fBls\\fR listet Dateien.\n"
)


def test_a_directory_of_man_pages_counts_them_and_says_how_to_read_them(tmp_path, monkeypatch):
    """/usr/share/man/de holds man pages only: the refusal counts what it skipped, as the warning does,
    and gives a command that renders them to text; where man-db is installed, that command works."""
    import gzip
    import shutil
    import subprocess

    man = tmp_path / "man" / "de"
    for name in ("man1/ls.1.gz", "man1/cp.1.gz", "man8/mount.8.gz"):
        (man / name).parent.mkdir(parents=True, exist_ok=True)
        (man / name).write_bytes(gzip.compress(_ROFF.encode()))
    write(man / "index.html", "")
    with pytest.raises(SnuggleError) as e:
        resolve_files(str(man))
    msg = str(e.value)
    assert "4 files skipped (2 .1.gz, 1 " in msg and "1 .8.gz" in msg and "1 .html" in msg, msg
    assert "man pages are roff source" in msg and "mandoc -T utf8" in msg, msg
    with pytest.raises(SnuggleError, match=r"3 files match.*man pages are roff source"):
        resolve_files(str(man / "**" / "*.gz"))
    # other files than man pages get the count, and no advice about man pages
    write(tmp_path / "web" / "a.html", "")
    with pytest.raises(SnuggleError, match=r"1 files skipped \(1 \.html\)$"):
        resolve_files(str(tmp_path / "web"))
    if not (shutil.which("man") and shutil.which("col")):
        return
    monkeypatch.chdir(tmp_path)
    command = msg.split("e.g. ", 1)[1].split(" (or mandoc", 1)[0]
    subprocess.run(["bash", "-c", command], check=True, timeout=60)
    texts = sorted(iter_documents(resolve_files("man-txt")))
    assert len(texts) == 3 and all("Verzeichnisinhalte auflisten" in t and ".TH" not in t for t in texts)


def test_resolve_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "notes.md", "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SnuggleError, match=r"unsupported training file type '\.md'"):
        resolve_files("notes.md")
    with pytest.raises(SnuggleError, match=r"^no training files match 'corpus/\*\.txt'$"):
        resolve_files("corpus/*.txt")
    with pytest.raises(SnuggleError, match="does not exist: 'missing.txt'"):
        resolve_files(["missing.txt"])
    with pytest.raises(SnuggleError, match="under directory 'empty'"):
        resolve_files("empty")
    with pytest.raises(SnuggleError, match="no training files given"):
        resolve_files([])


@pytest.mark.parametrize("ext", [".gz", ".bz2", ".xz"])
def test_compressed_text_files_read_as_what_they_hold(tmp_path, tokenizer, ext):
    import bz2
    import gzip
    import lzma

    pack = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[ext]
    plain = {
        "a.txt": "the cat\nsat on\n",
        "b.jsonl": '{"text": "w1 w2"}\n{"text": "w3"}\n',
        "c.json": json.dumps([{"text": "w4"}]),
    }
    files = [write(tmp_path / "plain" / n, t) for n, t in plain.items()]
    packed = [write(tmp_path / "packed" / (n + ext), pack(t.encode())) for n, t in plain.items()]
    write(tmp_path / "packed" / ("archive.tar" + ext), pack(b"not a corpus"))  # not a text file: skipped
    assert [p.name for p in resolve_files(str(tmp_path / "packed"))] == sorted(n + ext for n in plain)
    assert (
        list(iter_documents(packed))
        == list(iter_documents(files))
        == ["the cat\nsat on\n", "w1 w2", "w3", "w4"]
    )
    a = tokenize_corpus(files, tokenizer, cache_dir=tmp_path / "cache")
    b = tokenize_corpus(packed, tokenizer, cache_dir=tmp_path / "cache")
    assert a.tokens.tolist() == b.tokens.tolist() and a.path != b.path


def test_corrupt_or_truncated_compressed_file_is_one_error_naming_it(tmp_path):
    import gzip

    whole = gzip.compress(("w1 " * 50_000).encode())
    cut = write(tmp_path / "cut.txt.gz", whole[: len(whole) // 2])
    with pytest.raises(SnuggleError, match=r"cut\.txt\.gz: corrupt or truncated compressed data"):
        list(iter_documents([cut]))
    fake = write(tmp_path / "fake.jsonl.gz", '{"text": "not gzip"}\n')
    with pytest.raises(SnuggleError, match=r"fake\.jsonl\.gz: corrupt or truncated compressed data"):
        list(iter_documents([fake]))


def test_a_glob_matching_only_unsupported_files_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "docs" / "guide.html", "<p>x</p>")
    with pytest.raises(
        SnuggleError, match=r"no training files match 'docs/\*' \(1 files match, none of them .*guide\.html"
    ):
        resolve_files("docs/*")


def test_each_format(tmp_path):
    txt = write(tmp_path / "a.txt", "the cat\nsat on\n")
    # a null text is an empty document in every format (skipped), as Parquet's nulls below are
    jsonl = write(
        tmp_path / "b.jsonl",
        '{"text": "w1 w2"}\n\n   \n{"text": "", "x": 1}\n{"text": null}\n{"text": "w3"}\n',
    )
    js = write(tmp_path / "c.json", json.dumps([{"text": "w4"}, {"text": " "}, {"text": None}]))
    js_obj = write(tmp_path / "d.json", json.dumps({"meta": 1, "rows": [{"body": "w5"}, {"body": "w6"}]}))
    par = str(tmp_path / "e.parquet")
    table = pa.table({"text": ["w7", None, "", "w8", "w9"], "n": [1, 2, 3, 4, 5]})
    pq.write_table(table, par, row_group_size=2)  # several record batches; the null and "" are skipped

    want = ["the cat\nsat on\n", "w1 w2", "w3", "w4", "w7", "w8", "w9"]
    assert list(iter_documents([txt, jsonl, js, par])) == want
    assert list(iter_documents([js_obj], text_field="body")) == ["w5", "w6"]


def test_jsonl_errors_name_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.jsonl", '{"text": "w1"}\n\n{"text": "w2",\n')
    with pytest.raises(SnuggleError, match=rf"^{bad}:3: malformed JSON"):
        list(iter_documents([bad]))
    missing = write_jsonl(tmp_path / "m.jsonl", [{"text": "w1"}, {"content": "w2"}])
    with pytest.raises(SnuggleError, match=rf"^{missing}:2: missing field 'text'"):
        list(iter_documents([missing]))
    wrong = write_jsonl(tmp_path / "n.jsonl", [{"text": 5}])
    with pytest.raises(SnuggleError, match=rf"^{wrong}:1: field 'text' must be a string, got int"):
        list(iter_documents([wrong]))
    not_obj = write_jsonl(tmp_path / "o.jsonl", [["w1"]])
    with pytest.raises(SnuggleError, match=rf"^{not_obj}:1: expected a JSON object"):
        list(iter_documents([not_obj]))
    utf = write(tmp_path / "u.jsonl", b'{"text": "w1"}\n{"text": "\xff"}\n')
    with pytest.raises(SnuggleError, match=rf"^{utf}:2: invalid UTF-8"):
        list(iter_documents([utf]))


def test_other_format_errors(tmp_path):
    lines = write(tmp_path / "lines.json", '{"text": "w1"}\n{"text": "w2"}\n')
    with pytest.raises(SnuggleError, match=r"lines\.json:2: malformed JSON.*\.jsonl"):
        list(iter_documents([lines]))
    pq.write_table(pa.table({"body": ["w1"]}), tmp_path / "p.parquet")
    with pytest.raises(SnuggleError, match=r"p\.parquet: no column 'text' \(columns: body\)"):
        list(iter_documents([tmp_path / "p.parquet"]))
    junk = write(tmp_path / "junk.parquet", b"not parquet at all")
    with pytest.raises(SnuggleError, match="not a readable parquet file"):
        list(iter_documents([junk]))


def test_invalid_utf8_and_empty_corpus(tmp_path):
    bad = write(tmp_path / "bad.txt", b"w1 w2\n\xc3\x28 w3\n")
    with pytest.raises(SnuggleError, match=rf"^{bad}: invalid UTF-8"):
        list(iter_documents([bad]))
    blank = write(tmp_path / "blank.txt", "\n  \n")
    empty = write(tmp_path / "empty.jsonl", '{"text": ""}\n\n')
    with pytest.raises(SnuggleError, match=r"^corpus is empty: .*blank\.txt"):
        list(iter_documents([blank, empty]))


def test_text_pieces_split_at_lines_and_keep_text(tmp_path):
    text = "".join(f"w{i} é 🙂 ü\n" for i in range(50)) + "tail without newline"
    path = write(tmp_path / "big.txt", "\ufeff" + text)  # the BOM is dropped
    for piece_bytes in (1, 7, 64, 1 << 20):
        pieces = list(iter_text_pieces(path, piece_bytes=piece_bytes))
        assert "".join(pieces) == text
        if piece_bytes >= 64:  # pieces longer than a line end at a line boundary
            assert all(p.endswith("\n") for p in pieces[:-1])
    assert len(list(iter_text_pieces(path, piece_bytes=64))) > 5
    flags = [start for start, _ in iter_document_pieces([path, path], piece_bytes=64)]
    assert flags.count(True) == 2 and flags[0] and len(flags) > 10  # pieces of one file are one document


# ---------------------------------------------------------------- tokenize


def make_corpus(tmp_path) -> list[str]:
    a = write(tmp_path / "corpus" / "a.txt", "w1 w2\nw3\n")
    b = write_jsonl(tmp_path / "corpus" / "b.jsonl", [{"text": "w4"}, {"text": ""}, {"text": "w5 w6 w7"}])
    return [a, b]


def test_tokenize_layout_and_cache_reuse(tmp_path, tokenizer, capfd):
    files = make_corpus(tmp_path)
    stream = tokenize_corpus(files, tokenizer, cache_dir=tmp_path / "cache")
    assert capfd.readouterr() == ("", "")  # prints nothing
    want = [BOS, *ids("w1 w2 w3"), EOS, BOS, *ids("w4"), EOS, BOS, *ids("w5 w6 w7"), EOS]
    assert stream.tokens.dtype == np.uint32 and isinstance(stream.tokens, np.memmap)
    assert stream.tokens.tolist() == want and len(stream) == len(want)
    assert stream.doc_starts.dtype == np.int64 and stream.doc_starts.tolist() == [0, 5, 8]
    assert stream.num_docs == 3 and stream.eos_id == EOS
    assert tokenizer.calls  # it really tokenized

    tokenizer.calls.clear()
    again = tokenize_corpus(files, tokenizer, cache_dir=tmp_path / "cache")
    assert tokenizer.calls == []  # served from the cache
    assert again.path == stream.path and again.tokens.tolist() == want
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [stream.path.name]
    assert not [p for p in stream.path.iterdir() if ".tmp" in p.name]

    reopened = pickle.loads(pickle.dumps(stream))  # re-maps the cache, e.g. in spawned DataLoader workers
    assert isinstance(reopened.tokens, np.memmap) and reopened.tokens.tolist() == want


def test_cache_invalidation(tmp_path, tokenizer):
    files = make_corpus(tmp_path)
    first = tokenize_corpus(files, tokenizer, cache_dir=tmp_path / "cache")
    st = os.stat(files[0])
    write(tmp_path / "corpus" / "a.txt", "w9 w9\nw9\n")  # same size as before
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    tokenizer.calls.clear()
    second = tokenize_corpus(files, tokenizer, cache_dir=tmp_path / "cache")
    assert tokenizer.calls and second.path != first.path
    assert second.tokens[:4].tolist() == [BOS, *ids("w9 w9 w9")]

    subset = tokenize_corpus(files[1:], tokenizer, cache_dir=tmp_path / "cache")
    assert subset.path not in (first.path, second.path)

    both = write_jsonl(tmp_path / "both.jsonl", [{"text": "w1", "body": "w2"}])
    by_text = tokenize_corpus([both], tokenizer, cache_dir=tmp_path / "cache")
    by_body = tokenize_corpus(both, tokenizer, cache_dir=tmp_path / "cache", text_field="body")
    assert by_text.path != by_body.path and by_body.tokens.tolist() == [BOS, *ids("w2"), EOS]


def test_cache_sees_a_same_size_file_put_in_place_with_its_mtime_kept(tmp_path, tokenizer):
    # `cp -p` / `touch -r` / `rsync -t`: same path, same size, same mtime, other text; keyed by size and
    # mtime alone, the old tokens were served
    files = make_corpus(tmp_path)
    first = tokenize_corpus(files, tokenizer, cache_dir=tmp_path / "cache")
    st = os.stat(files[0])
    replacement = write(tmp_path / "new.txt", "w9 w9\nw9\n")  # same size as a.txt
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, files[0])
    assert (os.stat(files[0]).st_size, os.stat(files[0]).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    again = tokenize_corpus(files, tokenizer, cache_dir=tmp_path / "cache")
    assert again.path != first.path and again.tokens[:4].tolist() == [BOS, *ids("w9 w9 w9")]


def test_torn_cache_is_rebuilt(tmp_path, tokenizer):
    files = make_corpus(tmp_path)
    stream = tokenize_corpus(files, tokenizer, cache_dir=tmp_path / "cache")
    want = stream.tokens.tolist()
    (stream.path / "meta.json").unlink()  # as if killed before the commit marker was written
    tokenizer.calls.clear()
    rebuilt = tokenize_corpus(files, tokenizer, cache_dir=tmp_path / "cache")
    assert tokenizer.calls and rebuilt.tokens.tolist() == want
    with pytest.raises(SnuggleError, match="incomplete or corrupt token cache"):
        TokenStream.open(tmp_path)


def test_bad_input_leaves_no_cache_and_eos_required(tmp_path, tokenizer):
    bad = write(tmp_path / "bad.jsonl", '{"text": "w1"}\n{oops\n')
    with pytest.raises(SnuggleError, match=r"bad\.jsonl:2: malformed JSON"):
        tokenize_corpus([bad], tokenizer, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    tokenizer.eos_token = None
    with pytest.raises(SnuggleError, match="no eos_token"):
        tokenize_corpus(make_corpus(tmp_path), tokenizer, cache_dir=tmp_path / "cache")


def test_streamed_pieces_match_whole_file(tmp_path, tokenizer):
    # Invariant: cutting a big .txt into line-aligned pieces changes neither the tokens nor the document
    # boundaries (for a tokenizer that does not merge across newlines), and no tokenizer call sees more
    # than about one piece of it.
    rng = np.random.default_rng(0)
    lines = [" ".join(f"w{j}" for j in rng.integers(0, 300, rng.integers(0, 12))) for _ in range(400)]
    big = write(tmp_path / "big.txt", "\n".join(lines) + "\n")
    small = write(tmp_path / "small.txt", "w1 w2")
    whole = tokenize_corpus([big, small], tokenizer, cache_dir=tmp_path / "c1", piece_bytes=1 << 30)
    tokenizer.calls.clear()
    piece_bytes = 256
    streamed = tokenize_corpus([big, small], tokenizer, cache_dir=tmp_path / "c2", piece_bytes=piece_bytes)
    assert np.array_equal(whole.tokens, streamed.tokens)
    assert np.array_equal(whole.doc_starts, streamed.doc_starts) and streamed.num_docs == 2
    longest_line = max(len(line) for line in lines) + 1
    assert max(len(t) for call in tokenizer.calls for t in call) < piece_bytes + longest_line
    assert int((streamed.tokens == BOS).sum()) == 2  # continuation pieces get no BOS


# ---------------------------------------------------------------- packing


def random_stream(rng, n_docs: int) -> TokenStream:
    docs = [[BOS, *rng.integers(3, 300, rng.integers(0, 9)).tolist(), EOS] for _ in range(n_docs)]
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]]).astype(np.int64)
    tokens = np.array([t for d in docs for t in d], dtype=np.uint32)
    return TokenStream(tokens, starts, eos_id=EOS, bos_id=BOS)


@pytest.mark.parametrize("seq_len", [1, 2, 3, 5, 8, 64])
def test_packing_invariants(seq_len):
    rng = np.random.default_rng(seq_len)
    for n_docs in (1, 2, 7, 30):
        stream = random_stream(rng, n_docs)
        tokens, starts, n = stream.tokens.astype(np.int64), set(stream.doc_starts.tolist()), len(stream)
        doc_of = np.searchsorted(stream.doc_starts, np.arange(n), side="right") - 1
        rows = PackedRows(stream, seq_len)
        assert len(rows) == (n - 2) // seq_len + 1
        seen = np.zeros(n, dtype=int)
        for i in range(len(rows)):
            row = rows[i]
            assert all(v.shape == (seq_len,) and v.dtype == torch.int64 for v in row.values())
            inp, lab, pos, did = (row[k].numpy() for k in ("input_ids", "labels", "position_ids", "doc_ids"))
            for j in range(seq_len):
                g = i * seq_len + j  # stream offset of the input token; its target is g + 1
                if g + 1 < n:
                    seen[g + 1] += 1
                    assert inp[j] == tokens[g]
                    # masked exactly where the target starts a new document (the input is that EOS)
                    assert lab[j] == (IGNORE_INDEX if g + 1 in starts else tokens[g + 1])
                    assert (lab[j] == IGNORE_INDEX) == (inp[j] == EOS)
                    assert pos[j] == g - max(stream.doc_starts[doc_of[g]], i * seq_len)
                elif g < n:  # the last real token: nothing left to predict
                    assert inp[j] == tokens[g] and lab[j] == IGNORE_INDEX
                else:  # padding
                    assert inp[j] == EOS and lab[j] == IGNORE_INDEX
            real = [j for j in range(seq_len) if i * seq_len + j < n]
            for j in range(seq_len):
                for k in range(seq_len):
                    if j in real and k in real:
                        same_doc = doc_of[i * seq_len + j] == doc_of[i * seq_len + k]
                        assert (did[j] == did[k]) == same_doc
                    elif (j in real) != (k in real):
                        assert did[j] != did[k]  # padding never shares an id with a document
        assert seen[0] == 0 and (seen[1:] == 1).all()  # every token is a target exactly once
    with pytest.raises(IndexError):
        rows[len(rows)]


def test_packing_end_to_end_and_collate(tmp_path, tokenizer):
    stream = tokenize_corpus(make_corpus(tmp_path), tokenizer, cache_dir=tmp_path / "cache")
    rows = PackedRows(stream, 4)  # 13 tokens -> windows at 0, 4, 8 (5 tokens) and 12 (1 token: dropped)
    assert len(rows) == 3
    r0, r2 = rows[0], rows[2]
    assert r0["input_ids"].tolist() == [BOS, *ids("w1 w2 w3")]
    assert r0["labels"].tolist() == [*ids("w1 w2 w3"), EOS]
    r1 = rows[1]  # EOS | BOS w4 EOS | BOS
    assert r1["input_ids"].tolist() == [EOS, BOS, ids("w4")[0], EOS]
    assert r1["labels"].tolist() == [IGNORE_INDEX, ids("w4")[0], EOS, IGNORE_INDEX]
    assert r1["position_ids"].tolist() == [0, 0, 1, 2] and r1["doc_ids"].tolist() == [0, 1, 1, 1]
    assert r2["position_ids"].tolist() == [0, 1, 2, 3] and r2["doc_ids"].tolist() == [0, 0, 0, 0]

    batch = collate([r0, r1, r2])
    assert set(batch) == {"input_ids", "labels", "position_ids", "doc_ids"}
    assert all(v.shape == (3, 4) and v.dtype == torch.int64 for v in batch.values())
    assert torch.equal(rows.batch([1, 2])["labels"], batch["labels"][1:])

    padded = PackedRows(stream, 5)  # 13 tokens -> windows at 0, 5, 10 (3 tokens, padded)
    last = padded[2]
    assert last["input_ids"].tolist() == [ids("w6")[0], ids("w7")[0], EOS, EOS, EOS]
    assert last["labels"].tolist() == [ids("w7")[0], EOS, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert last["doc_ids"].tolist() == [0, 0, 0, 1, 1]


# ---------------------------------------------------------------- loader


def test_split_indices():
    train, val = split_indices(10, 0.7, seed=3)
    assert len(val) == 7 and len(train) == 3  # no float-noise extra row
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(10))
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()
    again = split_indices(10, 0.7, seed=3)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    val0 = split_indices(100, 0.1, seed=0)[1]
    assert any(not np.array_equal(split_indices(100, 0.1, seed=s)[1], val0) for s in (1, 2))
    assert len(split_indices(1000, 0.001, 0)[1]) == 1 and len(split_indices(2, 0.01, 0)[1]) == 1
    assert len(split_indices(5, 0.0, 0)[1]) == 0 and len(split_indices(1, 0.5, 0)[1]) == 0
    with pytest.raises(SnuggleError, match="no training rows"):
        split_indices(3, 0.9, 0)
    with pytest.raises(SnuggleError, match="val_fraction"):
        split_indices(3, 1.0, 0)


def step_rows(train, step, *, world_size, batch_size, grad_accum, seed):
    got = []
    for rank in range(world_size):
        plan = BatchPlan(
            train, batch_size=batch_size, grad_accum=grad_accum, world_size=world_size, rank=rank, seed=seed
        )
        mbs = plan.micro_batches(step)
        assert len(mbs) == grad_accum and all(mb.shape == (batch_size,) for mb in mbs)
        got.extend(mbs)
    return np.concatenate(got)


def test_batch_plan_same_global_batches_for_any_world_size():
    train = np.arange(100, 137)  # 37 rows: global batches of 16 straddle epochs
    layouts = [(1, 8, 2), (2, 4, 2), (4, 2, 2), (4, 4, 1), (2, 8, 1)]  # (world, batch, accum), G = 16
    for step in range(12):
        ref = step_rows(train, step, world_size=1, batch_size=8, grad_accum=2, seed=5)
        assert set(ref) <= set(train)
        for ws, bs, ga in layouts:
            got = step_rows(train, step, world_size=ws, batch_size=bs, grad_accum=ga, seed=5)
            assert np.array_equal(np.sort(got), np.sort(ref))
            assert np.array_equal(got, ref)  # rank shares are contiguous in the global order


def test_batch_plan_epochs_and_determinism():
    train = np.arange(0, 64, 2)  # 32 rows, G = 8: 4 steps per epoch
    plan = BatchPlan(train, batch_size=4, grad_accum=2, seed=1)
    epochs = [
        np.concatenate([np.stack(plan.micro_batches(s)).ravel() for s in range(e * 4, e * 4 + 4)])
        for e in range(3)
    ]
    for order in epochs:
        assert np.array_equal(np.sort(order), train)  # each epoch sees every training row once
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert [plan.epoch_of(s) for s in (0, 3, 4, 11, 12)] == [0, 0, 1, 2, 3]
    assert plan.steps_for_epochs(2) == 8 and plan.steps_for_epochs(0.1) == 1

    same = BatchPlan(train, batch_size=4, grad_accum=2, seed=1)
    other = BatchPlan(train, batch_size=4, grad_accum=2, seed=2)
    assert np.array_equal(np.stack(plan.micro_batches(9)), np.stack(same.micro_batches(9)))
    assert not np.array_equal(np.concatenate(plan.micro_batches(0)), np.concatenate(other.micro_batches(0)))
    assert plan._perm(2) is plan._perm(2)  # permutations are cached, not rebuilt per call

    with pytest.raises(SnuggleError, match="rank"):
        BatchPlan(train, batch_size=4, grad_accum=2, world_size=2, rank=2, seed=0)
    with pytest.raises(SnuggleError, match="batch_size"):
        BatchPlan(train, batch_size=0, grad_accum=2, seed=0)
    with pytest.raises(SnuggleError, match="no training rows"):
        BatchPlan([], batch_size=1, grad_accum=1, seed=0)


def test_iterate_eval(tmp_path, tokenizer):
    stream = random_stream(np.random.default_rng(0), 40)
    rows = PackedRows(stream, 6)
    indices = np.array([7, 2, 9, 4, 1])
    batches = list(iterate_eval(rows, indices, batch_size=2))
    assert [b["input_ids"].shape for b in batches] == [(2, 6), (2, 6), (1, 6)]
    assert torch.equal(batches[0]["input_ids"][1], rows[2]["input_ids"])  # in the given order
    assert sum(len(b["labels"]) for b in iterate_eval(rows, indices, 2, max_rows=3)) == 3
    shares = [list(iterate_eval(rows, indices, 2, world_size=2, rank=r)) for r in range(2)]
    assert sum(len(b["labels"]) for s in shares for b in s) == 5
