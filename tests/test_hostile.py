"""Hostile input: fuzzed configs, data files, GGUF and safetensors headers; no unpickling; no path escapes.

The contract under test: whatever a config, a data file, a model file or an adapter says, snuggle either
succeeds or raises `SnuggleError` (the CLI's one line and exit status 2); any other exception is a bug,
and so is a hang (every fuzzed call runs under a SIGALRM deadline). Loading never unpickles, and names
read from files never lead a path out of the directory that holds them.

Hypothesis runs derandomized (the same examples on every run, so CI is reproducible), with bounded
example counts that keep this file at about half a minute on two CPU cores; `SNUGGLE_FUZZ_SCALE=N`
runs N times as many fresh random examples, for a deeper search by hand.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import build_tiny_hf_model
from snuggle.config import RunConfig, config_from_dict, load_config
from snuggle.data.instruct import _iter_conversations
from snuggle.data.sources import hf_dataset_fingerprint, iter_documents, plain_name, resolve_files
from snuggle.errors import SnuggleError
from snuggle.io.gguf import iter_gguf_tensors, load_gguf_tokenizer, read_gguf_config
from snuggle.io.hf import iter_hf_tensors, load_hf_tokenizer, read_hf_config, save_hf_checkpoint
from snuggle.io.peft_format import load_peft_adapter, peft_lora_settings

pytestmark = pytest.mark.usefixtures("single_thread")

SRC = Path(__file__).resolve().parent.parent / "src" / "snuggle"


# SNUGGLE_FUZZ_SCALE=20 runs 20x the examples, fresh random ones each run: a deeper local search than CI's
_SCALE = int(os.environ.get("SNUGGLE_FUZZ_SCALE", "1"))


def fuzz(n: int) -> settings:
    """Reproducible, bounded fuzzing: the same `n` examples every run, no deadline per example (the
    SIGALRM guard below catches hangs), no example database written into the checkout."""
    return settings(
        max_examples=n * _SCALE,
        deadline=None,
        derandomize=_SCALE == 1,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


class Hang(BaseException):
    """Raised into a call that ran too long. A BaseException, so that no `except Exception` on the way
    (readers wrap foreign libraries' errors that way) can turn a hang into a tidy error message."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """A hang is a failure: raise Hang in the test if the body runs longer than `seconds`."""

    def expired(signum, frame):
        raise Hang(f"no result within {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def outcome(fn: Callable[[], Any], seconds: float = 20.0) -> Any:
    """`fn()`'s result, or the SnuggleError it raised; any other exception propagates (a bug)."""
    with time_limit(seconds):
        try:
            return fn()
        except SnuggleError as e:
            return e


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


# --- the config parser ------------------------------------------------------------------------------------

SECTIONS = ("model", "lora", "data", "train")
CONFIG_KEYS = (
    "path dtype device adapter enabled r alpha dropout rslora targets train_embeddings train format "
    "text_field chat_template split seq_len val_fraction cache_dir steps batch_size grad_accum lr "
    "embedding_lr weight_decay betas warmup_steps schedule min_lr_ratio max_grad_norm eval_every eval_rows "
    "save_every keep_checkpoints log_every output_dir seed resume report_to wandb_project"
).split()
VALID = {"model": {"path": "m"}, "data": {"train": "d.txt"}}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and inf included
    st.text(max_size=12),
    st.sampled_from(["1e-4", "cosine", "all-linear", "tensorboard", "nf4", "\x00", "../../x"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
sections = st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(max_size=6), values, max_size=5)
trees = st.dictionaries(st.sampled_from(SECTIONS) | st.text(max_size=6), sections | values, max_size=5)


def _merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for k, v in extra.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@fuzz(300)
@given(tree=trees, start_valid=st.booleans())
def test_fuzz_config_from_dict(tree, start_valid):
    tree = _merge(VALID, tree) if start_valid else tree
    got = outcome(lambda: config_from_dict(tree))
    assert isinstance(got, RunConfig | SnuggleError)
    if isinstance(got, RunConfig):  # what was accepted is sane: no NaN, no int beyond int64
        assert got.train.lr > 0 and got.train.lr < float("inf")
        assert 0 <= got.train.seed < 2**63


@fuzz(150)
@given(
    text=st.one_of(
        st.text(max_size=300),
        st.binary(max_size=300),
        trees.map(lambda t: yaml.safe_dump(_merge(VALID, t), allow_unicode=True)),
    ),
)
def test_fuzz_load_config_file(work, text):
    f = work / "fuzz.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    got = outcome(lambda: load_config(f))
    assert isinstance(got, RunConfig | SnuggleError)


dotted = st.builds(lambda s, k: f"{s}.{k}", st.sampled_from(SECTIONS), st.sampled_from(CONFIG_KEYS))


@fuzz(200)
@given(
    overrides=st.lists(
        st.one_of(
            st.text(max_size=20),
            st.builds(lambda k, v: f"{k}={v}", dotted | st.text(max_size=8), st.text(max_size=20)),
            st.builds(lambda k, v: f"{k}={json.dumps(v)}", dotted, values),
        ),
        max_size=4,
    )
)
def test_fuzz_config_overrides(overrides):
    got = outcome(lambda: load_config(None, ["model.path=m", "data.train=d.txt", *overrides]))
    assert isinstance(got, RunConfig | SnuggleError)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"train: {lr: \xff\xfe}\n", "not UTF-8"),
        (b"model: " + b"[" * 20000 + b"]" * 20000, "nested too deeply"),
        (b"train: {steps: " + b"9" * 5000 + b"}", "invalid YAML value"),
        (b"train: {warmup_steps: 2001-02-30}", "invalid YAML value"),
        (b"!!python/object/apply:os.system ['touch pwned']", "invalid YAML"),
        (b"- a\n- b\n", "must be a YAML mapping"),
        # an alias bomb: nine levels of nine references, quoted in the error as one short line
        (
            b"data: {train: [&a [x,x,x,x,x,x,x,x,x], "
            + b"".join(
                f"&{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}], ".encode()
                for p, c in zip("abcdefgh", "bcdefghi", strict=True)
            )
            + b"*i]}\n",
            "config key 'data.train' must be str | list[str], got [[",
        ),
    ],
    ids=["utf8", "deep", "digits", "date", "python-tag", "list", "alias-bomb"],
)
def test_bad_config_files(work, content, fragment):
    f = work / "bad.yaml"
    f.write_bytes(content)
    got = outcome(lambda: load_config(f), seconds=10)
    assert isinstance(got, SnuggleError) and fragment in str(got), got
    assert len(str(got)) < 400 and "\n" not in str(got)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.lr=.nan", "finite number"),
        ("train.lr=.inf", "finite number"),
        ("train.max_grad_norm=-.inf", "finite number"),
        ("train.steps=100000000000000000000000", "64-bit integer range"),
        ("train.seed=-1", "train.seed must be >= 0"),
        ("model.path=a\x00b", "NUL"),
        ("data.train=" + "[" * 5000 + "]" * 5000, "nested too deeply"),
        ("=1", "must look like section.key=value"),
    ],
    ids=["nan", "inf", "-inf", "huge-int", "seed", "nul", "deep", "no-key"],
)
def test_bad_config_values(override, fragment):
    got = outcome(lambda: load_config(None, ["model.path=m", "data.train=d.txt", override]))
    assert isinstance(got, SnuggleError) and fragment in str(got), got


def test_config_read_is_bounded(work, monkeypatch):
    import snuggle.config as config_mod

    monkeypatch.setattr(config_mod, "_MAX_CONFIG_BYTES", 1000)
    big = work / "big.yaml"
    big.write_text("model: {path: m}\n" + "#" * 2000)
    got = outcome(lambda: load_config(big))
    assert isinstance(got, SnuggleError) and "small YAML file" in str(got)
    assert isinstance(outcome(lambda: config_from_dict([1, 2])), SnuggleError)


# --- the data readers -------------------------------------------------------------------------------------

RECORD_KEYS = ["text", "messages", "instruction", "input", "output", "system", "role", "content"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(RECORD_KEYS) | st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=15,
)
chat_records = st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant", "tool", 3]), "content": scalars}
            ),
            max_size=4,
        )
    }
)
alpaca_records = st.fixed_dictionaries(
    {"instruction": scalars, "output": scalars}, optional={"input": scalars, "system": scalars}
)
records = json_values | chat_records | alpaca_records


def _jsonl(items: list[Any]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in items).encode()


def read_text(path: Path) -> list[str]:
    return list(iter_documents([path]))


def read_instruct(path: Path) -> list[Any]:
    return list(_iter_conversations([path], None))


@fuzz(150)
@given(
    suffix=st.sampled_from([".txt", ".jsonl", ".json"]),
    content=st.one_of(
        st.binary(max_size=400),
        st.lists(records, max_size=5).map(_jsonl),
        st.lists(records, max_size=5).map(lambda xs: json.dumps(xs).encode()),
        records.map(lambda x: json.dumps(x).encode()),
    ),
    cut=st.none() | st.integers(min_value=0, max_value=400),
)
def test_fuzz_text_readers(work, suffix, content, cut):
    f = work / f"fuzz{suffix}"
    f.write_bytes(content[:cut] if cut is not None else content)
    got = outcome(lambda: read_text(f))
    assert isinstance(got, list | SnuggleError)


@fuzz(150)
@given(
    suffix=st.sampled_from([".jsonl", ".json"]),
    content=st.one_of(
        st.binary(max_size=400),
        st.lists(records, max_size=5).map(_jsonl),
        st.lists(records, max_size=5).map(lambda xs: json.dumps(xs, indent=1).encode()),
        st.dictionaries(st.text(max_size=4), st.lists(records, max_size=3), max_size=2).map(
            lambda d: json.dumps(d).encode()
        ),
    ),
    cut=st.none() | st.integers(min_value=0, max_value=400),
)
def test_fuzz_instruct_readers(work, suffix, content, cut):
    f = work / f"fuzz-instruct{suffix}"
    f.write_bytes(content[:cut] if cut is not None else content)
    got = outcome(lambda: read_instruct(f))
    assert isinstance(got, list | SnuggleError)


@pytest.fixture(scope="module")
def parquet_seeds(work) -> dict[str, bytes]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = pa.table({"text": ["hello world"] * 40 + ["x" * 500], "n": list(range(41))})
    chat = pa.table(
        {
            "instruction": ["say hi"] * 20,
            "output": ["hi"] * 20,
            "messages": [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]] * 20,
        }
    )
    out = {}
    for name, table in (("text", text), ("chat", chat)):
        pq.write_table(table, work / f"seed-{name}.parquet")
        out[name] = (work / f"seed-{name}.parquet").read_bytes()
    return out


@fuzz(150)
@given(
    kind=st.sampled_from(["text", "chat"]),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.none() | st.floats(0, 1),
)
def test_fuzz_parquet(work, parquet_seeds, kind, flips, cut):
    data = bytearray(parquet_seeds[kind])
    for where, byte in flips:
        data[int(where * len(data))] = byte
    if cut is not None:
        data = data[: int(cut * len(data))]
    f = work / "fuzz.parquet"
    f.write_bytes(bytes(data))
    reader = read_text if kind == "text" else read_instruct
    got = outcome(lambda: reader(f))
    assert isinstance(got, list | SnuggleError)


@pytest.mark.parametrize(
    ("suffix", "content", "fragment"),
    [
        (".jsonl", b'{"text": ' + b"[" * 100000 + b"]" * 100000 + b"}\n", "nested too deeply"),
        (".json", b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (".jsonl", b'{"text": ' + b"1" * 5000 + b"}\n", "malformed JSON"),
        (".json", b'[{"text": ' + b"1" * 5000 + b"}]", "malformed JSON"),
        (".jsonl", b'{"text": "a\\ud800b"}\n', "unpaired surrogate \\ud800"),
        (".json", b'[{"text": "\\udfff"}]', "unpaired surrogate"),
        (".jsonl", b'{"text": "ok"}\n\xff\xfe\n', "invalid UTF-8"),
        (".jsonl", b"", "corpus is empty"),
        (".json", b"", "malformed JSON"),
        (".txt", b"\xef\xbb\xbf", "corpus is empty"),
        (".txt", b"abc\xff", "invalid UTF-8"),
    ],
)
def test_bad_text_files(work, suffix, content, fragment):
    f = work / f"bad{suffix}"
    f.write_bytes(content)
    got = outcome(lambda: read_text(f), seconds=10)
    assert isinstance(got, SnuggleError) and fragment in str(got), got


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        ({"instruction": None, "output": "x"}, "missing 'instruction'"),
        ({"instruction": "x", "output": None}, "missing 'output'"),
        ({"instruction": "x", "output": "\ud800"}, "unpaired surrogate"),
        (
            {"messages": [{"role": "user", "content": "\udc80"}, {"role": "assistant", "content": "a"}]},
            "surrogate",
        ),
        ({"messages": [{"role": "x" * 10000, "content": "a"}]}, "unknown role 'xxxx"),
        ({"messages": "hi"}, "'messages' must be a list"),
    ],
)
def test_bad_instruct_records(work, record, fragment):
    f = work / "bad-instruct.jsonl"
    f.write_text(json.dumps(record) + "\n")
    got = outcome(lambda: read_instruct(f))
    assert isinstance(got, SnuggleError) and fragment in str(got), got
    assert len(str(got)) < 400


def test_deep_instruct_json(work):
    f = work / "deep.json"
    f.write_bytes(b"[" + b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}]")
    got = outcome(lambda: read_instruct(f))
    assert isinstance(got, SnuggleError) and "nested too deeply" in str(got)


def test_jsonl_line_length_is_bounded(work, monkeypatch):
    import snuggle.data.sources as sources

    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 1000)
    f = work / "one-line.jsonl"
    f.write_bytes(b'{"text": "' + b"a" * 5000 + b'"}')  # no newline at all: a binary, a wrong name
    got = outcome(lambda: read_text(f))
    assert isinstance(got, SnuggleError) and "longer than 1000 bytes" in str(got)


def test_directory_walk_survives_symlink_loops(work):
    root = work / "loop"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "doc.txt").write_text("hello")
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)  # sub/up -> root -> sub -> ...
    (root / "self").symlink_to(root, target_is_directory=True)
    files = outcome(lambda: resolve_files(str(root)), seconds=10)
    assert files == [(root / "sub" / "doc.txt").resolve()]


@fuzz(100)
@given(
    dict_json=json_values | st.just({"splits": ["train"]}),
    state_json=json_values,
    split=st.none() | st.text(max_size=5),
)
def test_fuzz_hf_dataset_metadata(work, dict_json, state_json, split):
    d = work / "ds"
    (d / "train").mkdir(parents=True, exist_ok=True)
    (d / "dataset_dict.json").write_text(json.dumps(dict_json))
    (d / "train" / "state.json").write_text(json.dumps(state_json))
    (d / "train" / "dataset_info.json").write_text("{}")
    got = outcome(lambda: hf_dataset_fingerprint(d, split))
    assert isinstance(got, str | SnuggleError)


# --- GGUF headers -----------------------------------------------------------------------------------------

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_fields(b: bytes) -> list[tuple[int, int, str]]:
    """(offset, width, what) of every count, length, type, dimension and offset in a valid GGUF header:
    the places a corrupt or hostile file lies. An independent walk (not the one under test)."""
    out = [(8, 8, "tensor count"), (16, 8, "metadata count")]
    n_tensors, n_kv = struct.unpack_from("<QQ", b, 8)
    pos = 24

    def field(width: int, what: str) -> int:
        nonlocal pos
        out.append((pos, width, what))
        v = int.from_bytes(b[pos : pos + width], "little")
        pos += width
        return v

    def value(t: int) -> None:
        nonlocal pos
        if t in _SCALAR:
            pos += _SCALAR[t]
        elif t == 8:
            n = field(8, "string length")  # not `pos += field(...)`: field moves pos first
            pos += n
        else:
            item, count = field(4, "array type"), field(8, "array length")
            for _ in range(count):
                value(item)

    for _ in range(n_kv):
        n = field(8, "key length")
        pos += n
        value(field(4, "value type"))
    for _ in range(n_tensors):
        n = field(8, "name length")
        pos += n
        for _ in range(field(4, "dimension count")):
            field(8, "dimension")
        field(4, "tensor type")
        field(8, "tensor offset")
    return out


@pytest.fixture(scope="module")
def gguf_seed(work) -> tuple[Path, bytes, list[tuple[int, int, str]]]:
    """A tiny valid GGUF (q8_0 matrices, the tokenizer's arrays, rope_freqs) as snuggle exports it."""
    from snuggle.io.gguf_export import write_gguf
    from snuggle.load import load

    model_dir = work / "gguf-base"
    build_tiny_hf_model("llama", True, model_dir, hidden_size=32, intermediate_size=64)
    model, tok = load(model_dir, dtype=torch.float32, device="cpu")
    path = work / "seed.gguf"
    write_gguf(model, tok, path, dtype="q8_0")
    data = path.read_bytes()
    return path, data, gguf_fields(data)


ABSURD = [
    0,
    1,
    2,
    3,
    7,
    8,
    9,
    13,
    255,
    2**16,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**40,
    2**63 - 1,
    2**63,
    2**64 - 1,
]


def read_gguf(path: Path) -> Any:
    from snuggle.load import load

    read_gguf_config(path)
    list(iter_gguf_tensors(path))
    return load(path, with_tokenizer=False, device="cpu")  # the model built from what the header says


@fuzz(250)
@given(
    pick=st.floats(0, 1, exclude_max=True),
    value=st.sampled_from(ABSURD) | st.integers(0, 2**64 - 1),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=3),
)
def test_fuzz_gguf_header(work, gguf_seed, pick, value, flips):
    path, seed, fields = gguf_seed
    data = bytearray(seed)
    offset, width, _ = fields[int(pick * len(fields))]
    data[offset : offset + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    header_end = fields[-1][0] + fields[-1][1]
    for where, byte in flips:
        data[int(where * header_end)] = byte
    f = work / "fuzz.gguf"
    f.write_bytes(bytes(data))
    outcome(lambda: read_gguf(f))


@fuzz(15)
@given(pick=st.floats(0, 1, exclude_max=True), value=st.sampled_from(ABSURD))
def test_fuzz_gguf_tokenizer(work, gguf_seed, pick, value):
    path, seed, fields = gguf_seed
    data = bytearray(seed)
    offset, width, _ = fields[int(pick * len(fields))]
    data[offset : offset + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    f = work / "fuzz-tok.gguf"
    f.write_bytes(bytes(data))
    outcome(lambda: load_gguf_tokenizer(f), seconds=60)


@pytest.mark.parametrize(
    ("what", "value"),
    [
        ("tensor count", 2**63),
        ("metadata count", 2**63),
        ("key length", 2**63),
        ("string length", 2**62),
        ("array length", 2**40),  # gguf-py alone loops forever on this one
        ("dimension count", 2**31),
        ("dimension", 2**40),
        ("tensor offset", 2**62),
        ("tensor type", 9999),
    ],
)
def test_absurd_gguf_headers_are_rejected_before_allocating(work, gguf_seed, what, value):
    path, seed, fields = gguf_seed
    data = bytearray(seed)
    offset, width, _ = next(f for f in fields if f[2] == what)
    if what == "array length":  # an array of one-byte items: each read past the end is empty, never fails
        data[offset - 4 : offset] = (0).to_bytes(4, "little")
    data[offset : offset + width] = value.to_bytes(width, "little")
    f = work / "absurd.gguf"
    f.write_bytes(bytes(data))
    for fn in (read_gguf_config, load_gguf_tokenizer):
        got = outcome(lambda fn=fn: fn(f), seconds=10)
        assert isinstance(got, SnuggleError) and "truncated or corrupt GGUF file" in str(got), got


def test_gguf_truncated_anywhere(work, gguf_seed):
    path, seed, fields = gguf_seed
    for cut in range(0, len(seed), max(1, len(seed) // 40)):
        f = work / "cut.gguf"
        f.write_bytes(seed[:cut])
        got = outcome(lambda f=f: read_gguf(f))
        assert isinstance(got, SnuggleError), cut


# --- safetensors headers ----------------------------------------------------------------------------------


def _safetensors(header: dict | bytes, body: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


@pytest.fixture(scope="module")
def hf_model(work) -> Path:
    d = work / "hf-base"
    build_tiny_hf_model("llama", False, d)
    return d


GOOD = {"a": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]}}
BODY = bytes(48)
HOSTILE_SAFETENSORS = {
    "length-huge": _safetensors(GOOD, BODY, 2**63),
    "length-past-end": _safetensors(GOOD, BODY, 10**6),
    "length-over-cap": _safetensors(GOOD, BODY, 200 * 10**6),
    "offset-out-of-range": _safetensors({"a": {**GOOD["a"], "data_offsets": [0, 10**12]}}, BODY),
    "offsets-reversed": _safetensors({"a": {**GOOD["a"], "data_offsets": [48, 0]}}, BODY),
    "dtype-unknown": _safetensors({"a": {**GOOD["a"], "dtype": "Q4"}}, BODY),
    "shape-mismatch": _safetensors({"a": {**GOOD["a"], "shape": [5, 3]}}, BODY),
    "shape-overflow": _safetensors({"a": {**GOOD["a"], "shape": [2**62, 2**62]}}, BODY),
    "shape-negative": _safetensors({"a": {**GOOD["a"], "shape": [-1, 3]}}, BODY),
    "not-json": _safetensors(b"{{{{", BODY),
    "deep-json": _safetensors(b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}", BODY),
    "body-short": _safetensors(GOOD, BODY[:-4]),
    "body-long": _safetensors(GOOD, BODY + b"xx"),
    "empty": b"",
    "short": b"\x01\x00",
}


@pytest.mark.parametrize("case", list(HOSTILE_SAFETENSORS))
def test_hostile_safetensors_are_refused(work, hf_model, case):
    d = work / f"st-{case}"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text((hf_model / "config.json").read_text())
    (d / "model.safetensors").write_bytes(HOSTILE_SAFETENSORS[case])
    got = outcome(lambda: list(iter_hf_tensors(d)))
    assert isinstance(got, SnuggleError) and "model.safetensors" in str(got), got
    # the same file as an adapter's weights and as a run checkpoint's trainables
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (d / "adapter_model.safetensors").write_bytes(HOSTILE_SAFETENSORS[case])
    model = _tiny_model(hf_model)
    for fn in (lambda: load_peft_adapter(model, d), lambda: peft_lora_settings(d)):
        assert isinstance(outcome(fn), SnuggleError)
    from snuggle.run_dir import check_run_shapes

    (d / "trainable.safetensors").write_bytes(HOSTILE_SAFETENSORS[case])
    assert isinstance(outcome(lambda: check_run_shapes(d, model, "run x")), SnuggleError)


_MODELS: dict[Path, Any] = {}


def _tiny_model(path: Path):
    from snuggle.load import load

    if path not in _MODELS:
        _MODELS[path] = load(path, dtype=torch.float32, device="cpu", with_tokenizer=False)[0]
    return _MODELS[path]


@fuzz(150)
@given(
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4),
    length=st.none() | st.sampled_from(ABSURD),
)
def test_fuzz_safetensors_header(work, hf_model, flips, length):
    src = (hf_model / "model.safetensors").read_bytes()
    n = struct.unpack_from("<Q", src)[0]
    data = bytearray(src)
    for where, byte in flips:
        data[8 + int(where * n)] = byte  # inside the JSON header
    if length is not None:
        data[:8] = (length & (2**64 - 1)).to_bytes(8, "little")
    d = work / "st-fuzz"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text((hf_model / "config.json").read_text())
    (d / "model.safetensors").write_bytes(bytes(data))
    got = outcome(lambda: list(iter_hf_tensors(d)))
    assert isinstance(got, list | SnuggleError)


HF_CONFIG_KEYS = (
    "model_type hidden_size num_hidden_layers vocab_size num_attention_heads num_key_value_heads "
    "intermediate_size head_dim rope_scaling rope_theta rope_parameters rms_norm_eps tie_word_embeddings "
    "max_position_embeddings sliding_window use_sliding_window attention_bias architectures"
).split()


@fuzz(100)
@given(cfg=st.dictionaries(st.sampled_from(HF_CONFIG_KEYS), values, max_size=3))
def test_fuzz_hf_config(work, hf_model, cfg):
    from snuggle.load import load

    d = work / "cfg-fuzz"
    d.mkdir(exist_ok=True)
    base = json.loads((hf_model / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**base, **cfg}))
    if not (d / "model.safetensors").exists():
        (d / "model.safetensors").symlink_to(hf_model / "model.safetensors")
    got = outcome(lambda: load(d, dtype=torch.float32, device="cpu", with_tokenizer=False))
    assert not isinstance(got, SnuggleError) or "\n" not in str(got)


def test_hf_config_sizes_are_checked_before_building(work, hf_model):
    d = work / "cfg-layers"
    d.mkdir(exist_ok=True)
    (d / "model.safetensors").symlink_to(hf_model / "model.safetensors")
    base = json.loads((hf_model / "config.json").read_text())
    for change, fragment in (
        ({"num_hidden_layers": 10**9}, "num_hidden_layers is 1000000000, but the weights hold 2 layers"),
        ({"hidden_size": -4}, "hidden_size = -4 is not a plausible size"),
        ({"vocab_size": 2**40}, "vocab_size"),
    ):
        (d / "config.json").write_text(json.dumps({**base, **change}))
        got = outcome(lambda: read_hf_config(d), seconds=10)
        assert isinstance(got, SnuggleError) and fragment in str(got), got
    (d / "config.json").write_text("[1, 2]")
    assert "a JSON object expected" in str(outcome(lambda: read_hf_config(d)))


# --- never unpickle, never run a file's code --------------------------------------------------------------

_PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _kw(call: ast.Call, name: str) -> Any:
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def _restricted_unpickling_only(tree: ast.Module) -> bool:
    """True when a module's only use of pickle is `import pickle` for subclasses of pickle.Unpickler that
    override find_class (an allowlist, as DCP's metadata reader needs): no pickle.load/loads, no bare
    pickle.Unpickler(...), no other pickling module."""
    restricted = False
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b) for b in node.bases}
            if "pickle.Unpickler" in bases:
                if not any(isinstance(b, ast.FunctionDef) and b.name == "find_class" for b in node.body):
                    return False
                restricted = True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if ast.unparse(node.func) in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
                return False
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PICKLING_MODULES:
            return False
        if isinstance(node, ast.Import) and any(
            a.name.split(".")[0] in _PICKLING_MODULES - {"pickle"} for a in node.names
        ):
            return False
    return restricted


def test_source_never_unpickles():
    """An AST scan of src/: no pickle modules (but a restricted Unpickler with its own find_class);
    torch.load only with weights_only=True; np.load only with allow_pickle=False; yaml only through
    safe_load; no eval/exec; transformers never trusts remote code."""
    problems = []
    for py in sorted(SRC.rglob("*.py")):
        tree = ast.parse(py.read_text(), str(py))
        restricted = _restricted_unpickling_only(tree)
        for node in ast.walk(tree):
            where = f"{py.relative_to(SRC.parent)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import | ast.ImportFrom) and not restricted:
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                )
                if any((n or "").split(".")[0] in _PICKLING_MODULES for n in names):
                    problems.append(f"{where}: imports a pickling module")
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            if name == "load" and owner == "torch" and _kw(node, "weights_only") is not True:
                problems.append(f"{where}: torch.load without weights_only=True")
            if name == "load" and owner in ("np", "numpy") and _kw(node, "allow_pickle") is not False:
                problems.append(f"{where}: np.load without allow_pickle=False")
            if owner == "yaml" and name in (
                "load",
                "unsafe_load",
                "full_load",
                "load_all",
                "unsafe_load_all",
            ):
                problems.append(f"{where}: yaml.{name} (use yaml.safe_load)")
            if name in ("eval", "exec") and isinstance(f, ast.Name):
                problems.append(f"{where}: {name}()")
            if _kw(node, "trust_remote_code") not in (None, False):
                problems.append(f"{where}: trust_remote_code is not False")
            if (
                name == "from_pretrained"
                and owner.startswith("Auto")
                and _kw(node, "trust_remote_code") is not False
            ):
                problems.append(f"{where}: {owner}.from_pretrained without trust_remote_code=False")
    assert not problems, "\n".join(problems)


class _Payload:
    """Unpickling this runs `touch MARKER`: what a malicious state.pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_state_pt_is_refused(tiny_hf_model, tmp_path):
    """A run directory is input too (copied from elsewhere, shared): resuming from a checkpoint whose
    state.pt holds a malicious pickle fails without running it (torch.load(weights_only=True))."""
    from snuggle.train.loop import train
    from test_train import learnable_docs, make_cfg, write_jsonl

    model_dir, _ = tiny_hf_model("llama", False, tmp_path)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", learnable_docs(30))
    out = tmp_path / "run"
    args = ("train.steps=2", "train.save_every=1")
    train(make_cfg(model_dir, corpus, out, *args))
    first = out / "checkpoint-0000001"
    (out / "latest").write_text(first.name)  # resume from step 1, with the same config
    marker = tmp_path / "PWNED"
    (first / "state.pt").write_bytes(pickle.dumps({"scheduler": _Payload(marker), "rng": []}))
    with pytest.raises((SnuggleError, pickle.UnpicklingError)):
        train(make_cfg(model_dir, corpus, out, *args, "train.resume=true"))
    assert not marker.exists(), "state.pt was unpickled"


def test_pickled_weights_are_never_loaded(work, hf_model):
    marker = work / "PWNED-weights"
    d = work / "pickled-model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text((hf_model / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    got = outcome(lambda: list(iter_hf_tensors(d)))
    assert isinstance(got, SnuggleError) and "safetensors only" in str(got)
    a = work / "pickled-adapter"
    a.mkdir(exist_ok=True)
    (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (a / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    got = outcome(lambda: load_peft_adapter(_tiny_model(hf_model), a))
    assert isinstance(got, SnuggleError) and "pickled" in str(got)
    assert not marker.exists()


def test_tokenizer_remote_code_is_never_run(work, hf_model):
    import shutil

    d = work / "remote-code"
    shutil.copytree(hf_model, d, dirs_exist_ok=True)
    marker = work / "PWNED-tokenizer"
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    (d / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    outcome(lambda: load_hf_tokenizer(d))  # refused or loaded without the custom class: never imported
    assert not marker.exists()


# --- names from files never become paths outside their directory -----------------------------------------


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "..", ".", "", "a\\b", "a\x00b", 3])
def test_plain_name(name):
    with pytest.raises(SnuggleError, match="is not a plain file name"):
        plain_name(name, "f.json", "shard")
    assert plain_name("model-00001-of-00002.safetensors", "f", "shard") == "model-00001-of-00002.safetensors"


def test_shard_index_cannot_escape(work, hf_model):
    d = work / "escape-index"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text((hf_model / "config.json").read_text())
    outside = work / "outside.safetensors"
    save_file({"x": torch.zeros(1)}, str(outside))
    for target in (f"../{outside.name}", str(outside)):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": target}}))
        got = outcome(lambda: list(iter_hf_tensors(d)))
        assert isinstance(got, SnuggleError) and "is not a plain file name" in str(got), got
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    assert "no weight_map" in str(outcome(lambda: list(iter_hf_tensors(d))))


def test_dataset_split_and_file_names_cannot_escape(work):
    d = work / "escape-ds"
    (d / "train").mkdir(parents=True, exist_ok=True)
    (d / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "../.."]}))
    got = outcome(lambda: hf_dataset_fingerprint(d, "../.."))
    assert isinstance(got, SnuggleError) and "is not a plain file name" in str(got), got
    (d / "train" / "dataset_info.json").write_text("{}")
    (d / "train" / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "../../../etc/passwd"}]})
    )
    got = outcome(lambda: hf_dataset_fingerprint(d, None))
    assert isinstance(got, SnuggleError) and "is not a plain file name" in str(got), got
    # a string, not a list: `in` would match any substring of it
    (d / "dataset_dict.json").write_text(json.dumps({"splits": "train"}))
    assert "no list of split names" in str(outcome(lambda: hf_dataset_fingerprint(d, "rai")))


def test_latest_pointer_cannot_leave_the_run(work):
    from snuggle.run_dir import run_checkpoint

    run = work / "escape-run"
    run.mkdir(exist_ok=True)
    elsewhere = work / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    (elsewhere / "meta.json").write_text("{}")
    for pointer in ("../elsewhere", str(elsewhere)):
        (run / "latest").write_text(pointer)
        got = outcome(lambda: run_checkpoint(run))
        assert isinstance(got, SnuggleError) and "not a checkpoint inside the run" in str(got), got
    (run / "latest").write_bytes(b"checkpoint-\xff")
    assert "unreadable checkpoint pointer" in str(outcome(lambda: run_checkpoint(run)))


def test_chat_template_names_cannot_escape_an_export(work, hf_model):
    import shutil

    d = work / "escape-template"
    shutil.copytree(hf_model, d, dirs_exist_ok=True)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = [
        {"name": "default", "template": "{{ 'x' }}"},
        {"name": "../../../escaped", "template": "EVIL"},
    ]
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    got = outcome(lambda: load_hf_tokenizer(d))
    assert isinstance(got, SnuggleError) and "chat template name '../../../escaped'" in str(got), got
    # and a tokenizer that came by another way is checked again before an export writes its files
    tok = build_tiny_tokenizer_with_templates({"default": "x", "/abs/evil": "y"})
    out = work / "export-out"
    got = outcome(
        lambda: save_hf_checkpoint({"w": torch.zeros(2)}, {"model_type": "llama"}, out, tokenizer=tok)
    )
    assert isinstance(got, SnuggleError) and "is not a plain name" in str(got)
    assert not out.exists()  # refused before anything was written


def build_tiny_tokenizer_with_templates(templates: dict[str, str]):
    from conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.chat_template = templates
    return tok


# --- the CLI end to end: one line, exit status 2, no traceback --------------------------------------------


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SNUGGLE_CACHE": str(cwd / "cache"), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "snuggle", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env=env,
    )


def test_cli_bad_inputs_end_in_one_line(work, hf_model, gguf_seed):
    cwd = work / "cli"
    cwd.mkdir(exist_ok=True)
    (cwd / "bad-utf8.yaml").write_bytes(b"model: {path: \xff}\n")
    (cwd / "deep.yaml").write_bytes(b"model: " + b"[" * 20000 + b"]" * 20000)
    deep = cwd / "deep.jsonl"
    deep.write_bytes(b'{"text": ' + b"[" * 100000 + b"]" * 100000 + b"}\n")
    big_array = bytearray(gguf_seed[1])
    offset = next(o for o, _, what in gguf_seed[2] if what == "array length")
    big_array[offset - 4 : offset + 8] = (0).to_bytes(4, "little") + (2**40).to_bytes(8, "little")
    (cwd / "hostile.gguf").write_bytes(bytes(big_array))
    corpus = cwd / "ok.txt"
    corpus.write_text("the cat sees the dog")
    cases = [
        (["train", "bad-utf8.yaml"], "not UTF-8"),
        (["train", "deep.yaml"], "nested too deeply"),
        (["train", "none.yaml", "model.path=m", "data.train=x", "train.lr=.nan"], "finite number"),
        (["eval", "--model", str(hf_model), "--data", str(deep), "--seq-len", "16"], "nested too deeply"),
        (["eval", "--model", "hostile.gguf", "--data", str(corpus)], "truncated or corrupt GGUF file"),
    ]
    (cwd / "none.yaml").write_text("{}")
    for args, fragment in cases:
        r = _run_cli(*args, cwd=cwd)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stdout + r.stderr, r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("snuggle: error: ") and fragment in lines[0], r.stderr


def test_restricted_unpickling_rule_rejects_what_it_must():
    """The exception test_source_never_unpickles makes for DCP's metadata reader holds only for an
    Unpickler subclass with its own find_class and no direct pickle.load."""
    ok = (
        "import pickle\n"
        "class U(pickle.Unpickler):\n"
        "    def find_class(self, m, n):\n"
        "        raise KeyError(m)\n"
    )
    assert _restricted_unpickling_only(ast.parse(ok))
    for bad in (
        "import pickle\nclass U(pickle.Unpickler):\n    pass\n",
        ok + "x = pickle.loads(b'')\n",
        ok + "x = pickle.Unpickler(f).load()\n",
        ok + "import dill\n",
        "import pickle\n",
    ):
        assert not _restricted_unpickling_only(ast.parse(bad)), bad
