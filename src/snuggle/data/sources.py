"""Finding training files and reading documents out of them.

Supported formats: `.txt` (one file = one document), `.jsonl` (one object per line), `.json` (a list of
objects), `.parquet` (a string column) and Hugging Face `datasets` directories written by `save_to_disk`
(a string column; needs the optional `datasets` package). Everything that can be streamed is streamed, so
that a corpus larger than RAM can be tokenized: `.txt` in line-aligned pieces, `.jsonl` line by line,
`.parquet` and datasets directories (memory-mapped Arrow) in record batches. Only `.json` is parsed
whole, because the standard library cannot stream it.

A datasets directory is one training "file" to everything downstream: `resolve_files` returns the
directory itself (never the Arrow files inside), and the token caches key it by `hf_dataset_fingerprint`.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import shlex
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from snuggle.errors import SnuggleError

__all__ = [
    "COMPRESSIONS",
    "SUFFIXES",
    "check_documents",
    "file_kind",
    "file_stamps",
    "hf_dataset_fingerprint",
    "is_hf_dataset_dir",
    "iter_document_pieces",
    "iter_documents",
    "iter_text_pieces",
    "open_binary",
    "open_hf_dataset",
    "resolve_files",
]

SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".json", ".parquet")
# Compressed text files read as what they hold (`a.txt.gz` as a .txt): corpora often ship that way (the
# Debian documentation packages do). Parquet compresses inside the file, so it never needs this.
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_COMPRESSIBLE = (".txt", ".jsonl", ".json")
_EXPECTED = f"{', '.join(SUFFIXES)}, the first three also as {'/'.join(COMPRESSIONS)}"
_GLOB_CHARS = frozenset("*?[")
_PARQUET_BATCH_ROWS = 1024
# Characters of whitespace-only text buffered while waiting to see whether a .txt document is empty.
_MAX_BLANK_BUFFER = 1 << 24
# A .jsonl line is one record held in memory whole: a file without line breaks (a corrupt or wrongly
# named binary) stops here instead of exhausting RAM.
MAX_LINE_BYTES = 1 << 30
# Lone UTF-16 surrogates: a JSON "\ud800" escape decodes to one, and no tokenizer can encode it.
_SURROGATE = re.compile("[\ud800-\udfff]")


def brief(e: BaseException, limit: int = 200) -> str:
    """A foreign library's error message as one short line."""
    msg = " ".join(str(e).split())
    return (msg[:limit] + ("..." if len(msg) > limit else "")) or type(e).__name__


def check_text(text: str, where: str, what: str) -> str:
    """`text` if it is valid Unicode (encodable as UTF-8), else an error naming where it came from."""
    m = _SURROGATE.search(text)
    if m:
        raise SnuggleError(
            f"{where}: {what} holds an unpaired surrogate \\u{ord(m.group()):04x} at character {m.start()} "
            "(invalid Unicode; fix the \\u escape in the file)"
        )
    return text


def parse_json(text: str | bytes, where: str) -> Any:
    """json.loads whose every failure is one SnuggleError naming `where`: syntax, but also what json lets
    escape as other types (5000-digit integers are a ValueError, deep nesting a RecursionError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one object per line? name the file .jsonl)" if e.msg == "Extra data" else ""
        raise SnuggleError(f"{where}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno}){hint}") from None
    except ValueError as e:
        raise SnuggleError(f"{where}: malformed JSON: {brief(e, 120)}") from None
    except RecursionError:
        raise SnuggleError(f"{where}: malformed JSON: nested too deeply") from None


def plain_name(name: Any, where: str, what: str) -> str:
    """`name` if it names an entry directly inside a directory (no separators, not '.', '..' or absolute):
    names read from files must not lead a path out of the directory that holds them."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or Path(name).is_absolute()
    ):
        raise SnuggleError(f"{where}: {what} {name!r} is not a plain file name")
    return name


def file_kind(path: Path) -> str:
    """The format a file is read as: its suffix, lower-cased; for a compressed text file (`a.jsonl.gz`)
    the suffix under the compression. Anything else compressed (`a.tar.gz`) stays its outer suffix."""
    suffix = path.suffix.lower()
    if suffix in COMPRESSIONS:
        inner = Path(path.stem).suffix.lower()
        return inner if inner in _COMPRESSIBLE else suffix
    return suffix


def _supported(path: Path, kinds: Sequence[str] = SUFFIXES) -> bool:
    return file_kind(path) in kinds


class _Decompressing:
    """A binary reader over a compressed file whose corrupt or truncated data is one `SnuggleError`
    naming the file, not the codec's exception type of the day (OSError, EOFError, zlib/lzma errors)."""

    def __init__(self, path: Path, opener) -> None:
        self.path, self._f = path, opener(path, "rb")

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise SnuggleError(f"{self.path}: corrupt or truncated compressed data ({brief(e)})") from None

    def read(self, n: int = -1) -> bytes:
        return self._guard(self._f.read, n)

    def readline(self, n: int = -1) -> bytes:
        return self._guard(self._f.readline, n)

    def __enter__(self) -> _Decompressing:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def open_binary(path: Path):
    """The file's bytes for reading, decompressed when its name says it is compressed (`COMPRESSIONS`)."""
    try:
        opener = COMPRESSIONS.get(path.suffix.lower()) if file_kind(path) in _COMPRESSIBLE else None
        return _Decompressing(path, opener) if opener is not None else open(path, "rb")
    except OSError as e:
        raise SnuggleError(f"{path}: cannot read training file: {e.strerror}") from None


# --- Hugging Face datasets directories ----------------------------------------------------------------------

_HF_DICT = "dataset_dict.json"  # a DatasetDict: one sub-directory per split
_HF_STATE, _HF_INFO = "state.json", "dataset_info.json"  # a Dataset (both, as datasets.load_from_disk wants)
_HF_BATCH_ROWS = 1024


def is_hf_dataset_dir(path: Path) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and (
        (path / _HF_DICT).is_file() or ((path / _HF_STATE).is_file() and (path / _HF_INFO).is_file())
    )


def _hf_split_dir(path: Path, split: str | None) -> Path:
    """The directory holding the Arrow files of `split` (a DatasetDict's sub-directory, or `path`)."""
    if not (path / _HF_DICT).is_file():
        return path
    name = split or "train"
    try:
        raw = (path / _HF_DICT).read_bytes()
    except OSError as e:
        raise SnuggleError(f"{path / _HF_DICT}: unreadable datasets split list ({e.strerror})") from None
    tree = parse_json(raw, str(path / _HF_DICT))
    splits = tree.get("splits") if isinstance(tree, dict) else None
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise SnuggleError(f"{path / _HF_DICT}: unreadable datasets split list (no list of split names)")
    if name not in splits:
        raise SnuggleError(
            f"{path}: the dataset has no split '{name}' "
            f"(splits: {', '.join(map(str, splits))}); set data.split"
        )
    return path / plain_name(name, str(path / _HF_DICT), "split")


def hf_dataset_fingerprint(path: Path, split: str | None) -> str:
    """Cache-key part of a datasets directory: its split list, the split's state (which holds the
    dataset's `_fingerprint`) and info files, and the size and mtime of each Arrow file they list."""
    h = hashlib.sha256(str(split or "train").encode())
    split_dir = _hf_split_dir(path, split)
    where = str(split_dir / _HF_STATE)
    try:
        if (path / _HF_DICT).is_file():
            h.update((path / _HF_DICT).read_bytes())
        state = (split_dir / _HF_STATE).read_bytes()
        h.update(state)
        h.update((split_dir / _HF_INFO).read_bytes())
        tree = parse_json(state, where)
        files = tree.get("_data_files", []) if isinstance(tree, dict) else None
        if not isinstance(files, list) or not all(isinstance(f, dict) and "filename" in f for f in files):
            raise SnuggleError(f"{where}: unreadable datasets state (_data_files is not a list of files)")
        for f in files:
            name = plain_name(f["filename"], where, "data file")
            st = (split_dir / name).stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    except OSError as e:
        raise SnuggleError(f"{split_dir}: unreadable datasets directory ({brief(e)})") from None
    return h.hexdigest()


def open_hf_dataset(path: Path, split: str | None = None) -> Any:
    """`datasets.load_from_disk` of a directory (the `split` of a DatasetDict, default train), memory-mapped:
    nothing is read until rows are iterated."""
    try:
        import datasets
    except ImportError:
        raise SnuggleError(
            f"{path}: a Hugging Face datasets directory; reading it needs the 'datasets' package: "
            "pip install datasets"
        ) from None
    split_dir = _hf_split_dir(path, split)
    try:
        ds = datasets.load_from_disk(str(split_dir))
    except Exception as e:  # missing Arrow files, version skew, ...: one line naming the directory
        raise SnuggleError(f"{split_dir}: unreadable datasets directory ({brief(e)})") from None
    return ds


def _hf_docs(path: Path, text_field: str, split: str | None) -> Iterator[str]:
    import pyarrow as pa

    ds = open_hf_dataset(path, split)
    if text_field not in ds.column_names:
        raise SnuggleError(f"{path}: no column '{text_field}' (columns: {', '.join(ds.column_names)})")
    dtype = getattr(ds.features[text_field], "dtype", None)
    if dtype not in ("string", "large_string", "string_view"):
        raise SnuggleError(f"{path}: column '{text_field}' must hold strings, got {ds.features[text_field]}")
    try:
        for batch in ds.select_columns([text_field]).iter(batch_size=_HF_BATCH_ROWS):
            # Nulls are treated like empty strings: skipped.
            yield from (t for t in batch[text_field] if t is not None)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise SnuggleError(f"{path}: corrupt datasets directory: {brief(e)}") from None


def file_stamps(files: Sequence[Path], split: str | None) -> list[list[Any]]:
    """What a token cache key records of its inputs: (path, size, mtime, inode, ctime) of a file, (path,
    split, fingerprint) of a datasets directory; a file that cannot be read fails here, naming it.

    Size and mtime alone miss a same-size file put in place with its mtime kept (`cp -p`, `touch -r`,
    rsync -t): the inode and the status-change time, which no user call can set back, catch those. The
    price is a re-tokenization after a chmod or a rename, never a stale cache."""
    stamps: list[list[Any]] = []
    for path in files:
        if path.is_dir():
            stamps.append([str(path), split or "train", hf_dataset_fingerprint(path, split)])
            continue
        try:
            st = path.stat()
        except OSError as e:
            raise SnuggleError(f"{path}: cannot read training file: {e.strerror}") from None
        stamps.append([str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns])
    return stamps


# --- finding files ------------------------------------------------------------------------------------------


def _walk_dir(
    root: Path, kinds: Sequence[str] = SUFFIXES, skipped_out: Counter[str] | None = None
) -> list[Path]:
    # Hidden files and folders (.git, .cache, a tokenization cache placed beside the corpus) are never
    # training data, so they are skipped rather than reported.
    # Links are followed (a corpus assembled from links is common), but each real directory is walked
    # once: a link back to a parent would otherwise make the walk endless.
    found = []
    skipped: Counter[str] = Counter()  # suffix -> files left out
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames.clear()
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        if is_hf_dataset_dir(Path(dirpath)):
            found.append(Path(dirpath))  # the dataset as a whole; its Arrow files are not documents
            dirnames.clear()
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath, name)
            if name.startswith("."):
                continue
            if _supported(path, kinds):
                found.append(path)
            else:
                skipped[_skip_kind(path)] += 1
    if skipped_out is not None:
        skipped_out.update(skipped)
    if found and skipped and tuple(kinds) == SUFFIXES:
        # a Debian doc tree holds .html and man pages (.1.gz) beside .txt: say what was left out, or
        # a user believes the model trained on all of it (instruction data passes over README.txt etc.
        # by design, so only a text corpus is told)
        warnings.warn(
            f"{root}: {skipped.total()} files are not training data and were skipped "
            f"({_kinds_seen(skipped)}); read are {_EXPECTED}{_man_page_hint(skipped, root)}",
            stacklevel=2,
        )
    return found


def _skip_kind(path: Path) -> str:
    # a man page is ls.1.gz: name it by both suffixes, not as a .gz we would read
    return ("".join(path.suffixes[-2:]) if path.suffix in COMPRESSIONS else path.suffix) or "(no suffix)"


def _kinds_seen(skipped: Counter[str]) -> str:
    return ", ".join(f"{n} {suffix}" for suffix, n in skipped.most_common(6)) + (
        ", ..." if len(skipped) > 6 else ""
    )


# a man page's suffixes: ls.1.gz, perlfunc.1perl.gz, CA.pl.1ssl.gz, sh.1
_MAN_PAGE = re.compile(r"\.[1-9][a-z]*(\.(gz|bz2|xz))?")


def _man_page_hint(skipped: Counter[str], root: Path | str) -> str:
    """How to read the man pages among the skipped files: they are roff source, which the man reader
    renders (a model trained on the raw `.TH`/`\\fB` markup would learn the markup); rendered to plain
    text they are a corpus like any other."""
    if not any(_MAN_PAGE.fullmatch(kind) for kind in skipped):
        return ""
    return (
        "; man pages are roff source, not text: render them to .txt first, e.g. mkdir -p man-txt && "
        f"find {shlex.quote(str(root))} -type f -name '*.[1-9]*' | while read -r f; do man -l \"$f\" "
        '2>/dev/null | col -bx > "man-txt/$(basename "$f" .gz).txt"; done (or mandoc -T utf8 FILE | col -bx '
        "in place of man -l), then set data.train=man-txt"
    )


def _resolve_entry(entry: str, kinds: Sequence[str]) -> list[Path]:
    expected = _EXPECTED if tuple(kinds) == SUFFIXES else ", ".join(kinds)  # what a walk or glob takes
    expanded = os.path.expanduser(entry)
    path = Path(expanded)
    # A real path wins over glob syntax, so that a file literally named "a[1].txt" still works.
    if path.is_file():
        if not _supported(path):
            raise SnuggleError(
                f"unsupported training file type '{path.suffix}': {entry} (expected {_EXPECTED})"
            )
        return [path]
    if path.is_dir():
        skipped: Counter[str] = Counter()
        found = _walk_dir(path, kinds, skipped)
        if not found:
            counted = f"; {skipped.total()} files skipped ({_kinds_seen(skipped)})" if skipped else ""
            raise SnuggleError(
                f"no training files ({expected}) or datasets directories under directory '{entry}'"
                f"{counted}{_man_page_hint(skipped, entry)}"
            )
        return found
    if not _GLOB_CHARS.intersection(expanded):
        raise SnuggleError(f"data path does not exist: '{entry}'")
    found, other = [], []
    for match in glob.glob(expanded, recursive=True):
        m = Path(match)
        if m.is_dir():
            found.extend(_walk_dir(m, kinds))
        elif m.is_file():
            (found if _supported(m, kinds) else other).append(m)
    if not found:
        # say why when the pattern did match files: none of a type snuggle reads
        why = f" ({len(other)} files match, none of them {expected}: e.g. {other[0].name})" if other else ""
        hint = _man_page_hint(Counter(map(_skip_kind, other)), os.path.commonpath(other)) if other else ""
        raise SnuggleError(f"no training files match '{entry}'{why}{hint}")
    return found


def resolve_files(
    spec: str | os.PathLike[str] | list[str | os.PathLike[str]], kinds: Sequence[str] = SUFFIXES
) -> list[Path]:
    """Expand files, directories (recursive) and globs (`**` allowed) into a sorted, de-duplicated list.

    Directories and globs take the files of `kinds` (file_kind suffixes) and pass over the rest, so a
    README.txt beside instruction data is not read as a record file; a file named outright is the
    caller's to accept or refuse.

    Returned paths are absolute and symlink-resolved, so the list (and any cache key built from it) does
    not depend on the working directory or on how the same file was reached.
    """
    entries = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    if not entries:
        raise SnuggleError("no training files given")
    files: set[Path] = set()
    for entry in entries:
        files.update(p.resolve() for p in _resolve_entry(os.fspath(entry), kinds))
    return sorted(files)


def iter_text_pieces(path: str | Path, piece_bytes: int = 1 << 20) -> Iterator[str]:
    """Stream a UTF-8 text file as pieces of roughly `piece_bytes`, cut just after a newline.

    Concatenating the pieces gives the file's text exactly (minus a leading BOM). Cutting at line
    boundaries keeps tokenization of the pieces close to tokenization of the whole file; a line longer
    than a piece is cut at a space, and only as a last resort mid-word.
    """
    if piece_bytes < 1:
        raise ValueError(f"piece_bytes must be >= 1, got {piece_bytes}")
    path = Path(path)
    # utf-8-sig drops a BOM; the incremental decoder copes with a character split across two reads.
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
    pending = ""
    consumed = 0
    with open_binary(path) as f:
        while True:
            chunk = f.read(piece_bytes)
            try:
                pending += decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise SnuggleError(
                    f"{path}: invalid UTF-8 near byte {consumed + e.start}: {e.reason} "
                    "(re-encode the file as UTF-8)"
                ) from None
            consumed += len(chunk)
            if not chunk:
                break
            if len(pending) < piece_bytes:
                continue
            cut = pending.rfind("\n") + 1 or pending.rfind(" ") + 1 or len(pending)
            yield pending[:cut]
            pending = pending[cut:]
    if pending:
        yield pending


def _txt_pieces(path: Path, piece_bytes: int) -> Iterator[tuple[bool, str]]:
    # Whitespace-only text is held back until real text arrives, so that a blank file is skipped as an
    # empty document while leading blank lines of a real document are kept verbatim.
    blank: list[str] = []
    blank_chars = 0
    started = False
    for piece in iter_text_pieces(path, piece_bytes):
        if started:
            yield False, piece
        elif piece.strip():
            started = True
            yield True, "".join(blank) + piece
            blank.clear()
        else:
            blank.append(piece)
            blank_chars += len(piece)
            if blank_chars > _MAX_BLANK_BUFFER:
                blank = blank[-1:]  # bound RAM on pathological whitespace-only files
                blank_chars = len(blank[0])


def iter_jsonl(path: Path) -> Iterator[tuple[object, str]]:
    """(parsed object, "file:line") for every non-blank line; bad UTF-8 or JSON names file:line.

    Shared by the text reader here and the instruction reader (data/instruct.py).
    """
    with open_binary(path) as f:
        lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            where = f"{path}:{lineno}"
            if len(raw) > MAX_LINE_BYTES:
                raise SnuggleError(
                    f"{where}: line longer than {MAX_LINE_BYTES} bytes (not JSON Lines? one record per line)"
                )
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise SnuggleError(f"{where}: invalid UTF-8 at column {e.start + 1}") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SnuggleError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
            except ValueError as e:  # 5000-digit integers and the like
                raise SnuggleError(f"{where}: malformed JSON: {brief(e, 120)}") from None
            except RecursionError:
                raise SnuggleError(f"{where}: malformed JSON: nested too deeply") from None
            yield obj, where


def _jsonl_docs(path: Path, text_field: str) -> Iterator[str]:
    for obj, where in iter_jsonl(path):
        yield _field(obj, text_field, where)


def _field(obj: object, text_field: str, where: str) -> str:
    if not isinstance(obj, dict):
        got = type(obj).__name__
        raise SnuggleError(f"{where}: expected a JSON object with field '{text_field}', got {got}")
    if text_field not in obj:
        keys = ", ".join(sorted(map(str, obj))[:8]) or "none"
        raise SnuggleError(f"{where}: missing field '{text_field}' (fields present: {keys})")
    text = obj[text_field]
    if text is None:
        return ""  # a null text is an empty document (skipped), as a null in Parquet or datasets is
    if not isinstance(text, str):
        raise SnuggleError(f"{where}: field '{text_field}' must be a string, got {type(text).__name__}")
    return check_text(text, where, f"field '{text_field}'")


def _json_docs(path: Path, text_field: str) -> Iterator[str]:
    with open_binary(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SnuggleError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    data = parse_json(text, str(path))
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise SnuggleError(
                f"{path}: expected a list of objects, or an object holding exactly one list; "
                f"found {len(lists)} list fields"
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise SnuggleError(f"{path}: expected a list of objects with field '{text_field}'")
    for i, obj in enumerate(data):
        yield _field(obj, text_field, f"{path}: item {i}")


def _parquet_docs(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    # a corrupt footer can hold column names that are not UTF-8: a decode error, not an ArrowException
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise SnuggleError(f"{path}: not a readable parquet file: {brief(e)}") from None
    if text_field not in schema.names:
        raise SnuggleError(f"{path}: no column '{text_field}' (columns: {', '.join(schema.names)})")
    kind = schema.field(text_field).type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16 only
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
        raise SnuggleError(f"{path}: column '{text_field}' must hold strings, got {kind}")
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
            # Nulls are treated like empty strings: skipped.
            yield from (t for t in batch.column(0).to_pylist() if t is not None)
    # Arrow reports corrupt pages as ArrowException or OSError; invalid UTF-8 in a string column
    # surfaces when the values are converted
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise SnuggleError(f"{path}: corrupt parquet data: {brief(e)}") from None


_READERS = {".jsonl": _jsonl_docs, ".json": _json_docs, ".parquet": _parquet_docs}


def iter_document_pieces(
    files: str | Path | Iterable[str | Path],
    text_field: str = "text",
    piece_bytes: int = 1 << 20,
    split: str | None = None,
) -> Iterator[tuple[bool, str]]:
    """Yield `(starts_document, text)`: every non-empty document as one or more consecutive pieces.

    Only `.txt` documents are split (see `iter_text_pieces`); other formats yield one piece per document.
    `split` picks the split of a DatasetDict directory (default train). Raises `SnuggleError` at the end
    if no file held a non-empty document.
    """
    if isinstance(files, str | os.PathLike):
        files = [files]  # one path, not a sequence of characters
    files = [Path(f) for f in files]
    any_doc = False
    for path in files:
        for start, piece in _file_pieces(path, text_field, piece_bytes, split):
            any_doc = True
            yield start, piece
    if not any_doc:
        raise _empty_corpus(files)


def _file_pieces(
    path: Path, text_field: str, piece_bytes: int, split: str | None
) -> Iterator[tuple[bool, str]]:
    """One file's (or datasets directory's) non-empty documents, as `iter_document_pieces` yields them."""
    suffix = file_kind(path)
    if path.is_dir():
        texts = _hf_docs(path, text_field, split)
    elif suffix == ".txt":
        yield from _txt_pieces(path, piece_bytes)
        return
    elif (reader := _READERS.get(suffix)) is not None:
        texts = reader(path, text_field)
    else:
        raise SnuggleError(f"unsupported training file type '{path.suffix}': {path}")
    for text in texts:
        if text.strip():
            yield True, text


def _empty_corpus(files: Sequence[Path]) -> SnuggleError:
    names = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
    return SnuggleError(f"corpus is empty: no non-empty document in {len(files)} file(s) ({names})")


def check_documents(files: Sequence[Path], text_field: str = "text", split: str | None = None) -> None:
    """Read the first document of every file, the way tokenizing will read all of them: a wrong format, a
    missing text field, a malformed first record or a corpus with no document at all is one error now,
    before a model is loaded, instead of after it (later records are checked as they are tokenized)."""
    found = False
    for path in files:
        with contextlib.closing(_file_pieces(Path(path), text_field, 1 << 16, split)) as pieces:
            found = next(pieces, None) is not None or found
    if not found:
        raise _empty_corpus([Path(f) for f in files])


def iter_documents(
    files: str | Path | Iterable[str | Path], text_field: str = "text", split: str | None = None
) -> Iterator[str]:
    """Yield every non-empty document as one string (a whole `.txt` file is one document)."""
    parts: list[str] = []
    for start, piece in iter_document_pieces(files, text_field, split=split):
        if start and parts:
            yield "".join(parts)
            parts.clear()
        parts.append(piece)
    if parts:
        yield "".join(parts)
