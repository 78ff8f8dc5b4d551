"""Tokenizing a corpus once into an on-disk, memory-mapped token cache.

Layout of one cache directory (named by the sha256 cache key):
    tokens.u32      raw little-endian uint32 token ids, every document followed by EOS   (N,)
    doc_starts.i64  raw int64 offset of each document's first token in tokens.u32       (D,)
    meta.json       counts and ids (max_id: the largest token id in tokens.u32); written last, so its
                    presence marks a complete cache
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from snuggle.data.sources import file_stamps, iter_document_pieces
from snuggle.errors import SnuggleError

__all__ = ["FORMAT_VERSION", "TokenStream", "check_token_ids", "tokenize_corpus", "tokenizer_id_limit"]

FORMAT_VERSION = 1
TOKENS_FILE = "tokens.u32"
STARTS_FILE = "doc_starts.i64"
META_FILE = "meta.json"
# A tokenizer call gets at most batch_docs pieces and roughly this many characters, so RAM stays bounded
# even when every piece is a full-size chunk of a huge .txt file.
_BATCH_CHARS = 4 << 20


@dataclass(eq=False)
class TokenStream:
    """The whole corpus as one token sequence: documents back to back, each ending in EOS."""

    tokens: np.ndarray  # (N,) uint32, normally a read-only np.memmap
    doc_starts: np.ndarray  # (D,) int64, doc_starts[0] == 0, strictly increasing
    eos_id: int
    bos_id: int | None = None
    path: Path | None = None
    max_id: int | None = None  # the largest id in `tokens`; None: not known yet (see max_token_id)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_docs(self) -> int:
        return int(self.doc_starts.shape[0])

    def max_token_id(self) -> int:
        if self.max_id is None:
            self.max_id = scan_max(self.tokens)
        return self.max_id

    @classmethod
    def open(cls, directory: str | Path) -> TokenStream:
        """Map a complete cache directory written by `tokenize_corpus`."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
            n_tokens, n_docs = int(meta["num_tokens"]), int(meta["num_docs"])
            ok = (
                meta.get("format") == FORMAT_VERSION
                and n_tokens > 0
                and (directory / TOKENS_FILE).stat().st_size == 4 * n_tokens
                and (directory / STARTS_FILE).stat().st_size == 8 * n_docs
            )
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise SnuggleError(f"{directory}: incomplete or corrupt token cache (delete it and re-run)")
        tokens = np.memmap(directory / TOKENS_FILE, dtype="<u4", mode="r", shape=(n_tokens,))  # (N,)
        doc_starts = np.fromfile(directory / STARTS_FILE, dtype="<i8")  # (D,)
        max_id = meta.get("max_id")  # absent from caches written before it was recorded: scanned on demand
        max_id = max_id if isinstance(max_id, int) else None
        return cls(tokens, doc_starts, int(meta["eos_id"]), meta.get("bos_id"), directory, max_id)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling a memmap copies the whole corpus; DataLoader workers started with "spawn" should
        # re-map the cache file instead.
        if self.path is not None:
            return (TokenStream.open, (self.path,))
        return (TokenStream, (self.tokens, self.doc_starts, self.eos_id, self.bos_id, None, self.max_id))


def scan_max(tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    """The largest id in a (memory-mapped) token array, read in chunks; -1 when empty."""
    best = -1
    for i in range(0, int(tokens.shape[0]), chunk):
        best = max(best, int(np.max(tokens[i : i + chunk])))
    return best


def tokenizer_id_limit(tokenizer: Any) -> int:
    """One past the largest id the tokenizer can produce (its vocabulary with added tokens)."""
    vocab = tokenizer.get_vocab()
    return max(len(tokenizer), max(vocab.values(), default=-1) + 1)


def check_token_ids(stream: Any, limit: int, what: str) -> None:
    """Refuse a token cache holding an id >= `limit` (`what` names the vocabulary: the tokenizer's or the
    model's): it was written by another tokenizer, and the ids would index past the embedding."""
    top = stream.max_token_id()
    if top >= limit:
        where = stream.path or "the token stream"
        raise SnuggleError(
            f"{where}: the token cache holds token id {top}, but {what} has only {limit} ids "
            "(a cache written by another tokenizer? delete it and re-run)"
        )


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    extra = [
        type(tokenizer).__name__,
        tokenizer.eos_token_id,
        getattr(tokenizer, "bos_token_id", None),
        getattr(tokenizer, "add_bos_token", None),
        getattr(tokenizer, "add_eos_token", None),
    ]
    h.update(json.dumps(extra, default=str).encode("utf-8"))
    return h.hexdigest()


def _cache_key(
    files: Sequence[Path], text_field: str, piece_bytes: int, tokenizer: Any, split: str | None
) -> str:
    payload = {
        "format": FORMAT_VERSION,
        "files": file_stamps(files, split),
        "text_field": text_field,
        # piece_bytes changes how large .txt files are cut for tokenization, hence the exact tokens.
        "piece_bytes": piece_bytes,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _batches(pieces: Iterator[tuple[bool, str]], batch_docs: int) -> Iterator[list[tuple[bool, str]]]:
    batch: list[tuple[bool, str]] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece[1])
        if len(batch) >= batch_docs or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_batch(tokenizer: Any, batch: list[tuple[bool, str]]) -> list[list[int]]:
    # Only a document's first piece gets special tokens (BOS); later pieces of a streamed .txt continue it.
    out: list[list[int]] = [[] for _ in batch]
    for special in (True, False):
        where = [i for i, (start, _) in enumerate(batch) if start == special]
        if not where:
            continue
        ids = tokenizer(
            [batch[i][1] for i in where],
            add_special_tokens=special,
            return_attention_mask=False,
            verbose=False,  # no "sequence longer than model_max_length" warning: we pack, not truncate
        )["input_ids"]
        for i, seq in zip(where, ids, strict=True):
            out[i] = seq
    return out


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def commit_cache_files(tmp: dict[str, Path], out: Path, names: Sequence[str]) -> None:
    """Move finished temp files into `out` in the order of `names` (meta.json last), then fsync `out`.

    meta.json goes last: a run killed at any point leaves either no meta.json (the cache is rebuilt next
    time) or a complete, consistent cache. Shared by the text and the instruction caches.
    """
    for name in names:
        _fsync_replace(tmp[name], out / name)
    dir_fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_cache(
    files: Sequence[Path],
    tokenizer: Any,
    text_field: str,
    piece_bytes: int,
    batch_docs: int,
    out: Path,
    split: str | None,
) -> None:
    eos = int(tokenizer.eos_token_id)
    tag = f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp = {name: out / (name + tag) for name in (TOKENS_FILE, STARTS_FILE, META_FILE)}
    try:
        n_tokens = n_docs = 0
        max_id = eos
        with open(tmp[TOKENS_FILE], "wb") as ft, open(tmp[STARTS_FILE], "wb") as fs:
            pieces = iter_document_pieces(files, text_field, piece_bytes, split)
            for batch in _batches(pieces, batch_docs):
                flat: list[int] = []
                starts: list[int] = []
                for (start, _), ids in zip(batch, _encode_batch(tokenizer, batch), strict=True):
                    if start:
                        if n_docs or starts:  # close the previous document
                            flat.append(eos)
                        starts.append(n_tokens + len(flat))
                    flat.extend(ids)
                ids_u4 = np.asarray(flat, dtype="<u4")  # (n,)
                if ids_u4.size:
                    max_id = max(max_id, int(ids_u4.max()))
                ft.write(ids_u4.tobytes())
                fs.write(np.asarray(starts, dtype="<i8").tobytes())
                n_tokens += len(flat)
                n_docs += len(starts)
            ft.write(np.asarray([eos], dtype="<u4").tobytes())  # close the last document
            n_tokens += 1
        meta = {
            "format": FORMAT_VERSION,
            "num_tokens": n_tokens,
            "num_docs": n_docs,
            "eos_id": eos,
            "bos_id": getattr(tokenizer, "bos_token_id", None),
            "max_id": max_id,
            "text_field": text_field,
            "files": [str(p) for p in files],
        }
        tmp[META_FILE].write_text(json.dumps(meta, indent=1), encoding="utf-8")
        commit_cache_files(tmp, out, (TOKENS_FILE, STARTS_FILE, META_FILE))
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)


def tokenize_corpus(
    files: str | Path | Sequence[str | Path],
    tokenizer: Any,
    *,
    text_field: str = "text",
    cache_dir: str | Path,
    batch_docs: int = 64,
    piece_bytes: int = 1 << 20,
    split: str | None = None,
) -> TokenStream:
    """Tokenize `files` into `cache_dir/<sha256 key>/`, or reuse that cache if it is already complete.

    Each document becomes `tokenizer(text, add_special_tokens=True)` ids followed by EOS. Large `.txt`
    files are tokenized in line-aligned pieces of about `piece_bytes`, so nothing needs the whole corpus
    (or a whole file) in RAM. A datasets directory among `files` is read for its `split` (DatasetDict;
    default train), and the cache is keyed by its fingerprint files (see `sources.file_stamps`).
    """
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise SnuggleError("the tokenizer has no eos_token: set one so that documents can be separated")
    if batch_docs < 1:
        raise SnuggleError(f"batch_docs must be >= 1, got {batch_docs}")
    if isinstance(files, str | os.PathLike):
        files = [files]  # one path, not a sequence of characters
    paths = [Path(f).resolve() for f in files]
    if not paths:
        raise SnuggleError("no training files given")
    out = Path(cache_dir) / _cache_key(paths, text_field, piece_bytes, tokenizer, split)
    if (out / META_FILE).exists():
        try:
            return TokenStream.open(out)
        except SnuggleError:
            pass  # a damaged cache under the right key is simply rebuilt
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_cache(paths, tokenizer, text_field, piece_bytes, batch_docs, out, split)
    except BaseException as e:
        with contextlib.suppress(OSError):
            out.rmdir()  # only succeeds if empty: leave no empty cache directory behind after bad input
        if is_cache_write(e, out):
            raise cache_write_error(out, e) from None
        raise
    return TokenStream.open(out)


def is_cache_write(e: BaseException, out: Path) -> bool:
    """An OSError of writing the cache (a corpus that cannot be read is reported by its reader)."""
    return isinstance(e, OSError) and (e.filename is None or str(e.filename).startswith(str(out.parent)))


def cache_write_error(out: Path, e: OSError) -> SnuggleError:
    """The token cache cannot be written (read-only, full, missing permissions): say where to put it."""
    return SnuggleError(
        f"token cache {out.parent}: cannot write it ({e.strerror or e}); set data.cache_dir "
        "(eval: --cache-dir) or $SNUGGLE_CACHE to a writable directory with room"
    )
