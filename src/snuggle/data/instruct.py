"""Instruction-tuning data: records -> chat-rendered token cache with a "train on this token" mask -> rows.

Records come from `.jsonl` / `.json` / `.parquet` files or Hugging Face `datasets` directories
(`save_to_disk`; the optional `datasets` package), in one of two shapes:

    Alpaca  {"instruction": str, "input": str (optional), "output": str, "system": str (optional)}
    chat    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}

An Alpaca record becomes the chat [system?, user = instruction + "\\n\\n" + input (input only when
non-empty), assistant = output]. Every conversation is rendered with one Jinja chat template: the
`chat_template` argument, else the tokenizer's, else `FALLBACK_TEMPLATE`:

    {system}\\n\\n### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}</s>

(turns separated by a blank line, `</s>` standing for the tokenizer's EOS token, which closes each
response). The loss covers assistant responses only. Their character spans are found by rendering the
conversation prefix by prefix: the response to message k is what `render(messages[:k+1])` adds to
`render(messages[:k], add_generation_prompt=True)`, i.e. the content plus the end-of-turn markup the
template closes the turn with (`<|im_end|>`, `<|eot_id|>`, `</s>`); whitespace the template writes after
such a special token (ChatML's newline) is not a target. The whole rendering is tokenized once and a token
is a target when its characters overlap a response span (so a token that fuses the template's separator
space with the reply's first word counts as the reply's). EOS is appended to every example that does
not already end with it (trailing whitespace aside); it is a target only when it directly follows
response tokens (a template whose replies end without a special token; the fallback closes them with EOS).

Cache layout (one directory per sha256 key of files, tokenizer, template and format):
    tokens.u32          uint32 token ids of all examples back to back, each closed by EOS   (N,)
    targets.u8          1 where the token is a training target (a response token), else 0  (N,)
    example_starts.i64  offset of each example's first token                                (E,)
    meta.json           counts and ids; written last, so its presence marks a complete cache

Packing (`PackedExamples`) puts whole examples into rows of `seq_len` tokens, never splitting one across
rows; an example longer than `seq_len` gets a row of its own, truncated (a warning counts them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snuggle.data.packing import IGNORE_INDEX, collate, row_tensors
from snuggle.data.sources import (
    COMPRESSIONS,
    brief,
    check_text,
    file_kind,
    file_stamps,
    is_hf_dataset_dir,
    iter_jsonl,
    open_binary,
    open_hf_dataset,
    parse_json,
)
from snuggle.data.tokenize import (
    _tokenizer_fingerprint,
    cache_write_error,
    commit_cache_files,
    is_cache_write,
    scan_max,
)
from snuggle.errors import SnuggleError

__all__ = [
    "check_conversations",
    "FALLBACK_TEMPLATE",
    "InstructStream",
    "PackedExamples",
    "end_of_turn_ids",
    "has_chat_template",
    "prompt_ids",
    "resolve_template",
    "tokenize_instruct",
]

FORMAT_VERSION = 3  # 2: EOS after a special end-of-turn token is no target; 3: no header targets
SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")
_EXPECTED = f"{', '.join(SUFFIXES)} (.jsonl, .json also as {'/'.join(COMPRESSIONS)}) or a datasets directory"
ROLES: tuple[str, ...] = ("system", "user", "assistant")
TOKENS_FILE = "tokens.u32"
TARGETS_FILE = "targets.u8"
STARTS_FILE = "example_starts.i64"
META_FILE = "meta.json"
_PARQUET_BATCH_ROWS = 1024

# The prompt format for tokenizers without a chat template (base models). Every message but the first is
# preceded by a blank line, so rendering a prefix of the conversation gives a prefix of the full text.
# Newlines are Jinja string literals because transformers renders with trim_blocks (a newline right
# after a block tag is dropped).
FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] }}"
    "{% else %}{{ '### Response:\\n' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{% endif %}"
)

Messages = list[dict[str, str]]


@dataclass(eq=False)
class InstructStream:
    """All examples back to back: tokens, a parallel target mask, and where each example starts."""

    tokens: np.ndarray  # (N,) uint32, normally a read-only np.memmap
    targets: np.ndarray  # (N,) uint8, 1 = the loss predicts this token
    example_starts: np.ndarray  # (E,) int64, example_starts[0] == 0, strictly increasing
    eos_id: int
    path: Path | None = None
    max_id: int | None = None  # the largest id in `tokens`; None: not known yet (see max_token_id)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_examples(self) -> int:
        return int(self.example_starts.shape[0])

    def max_token_id(self) -> int:
        if self.max_id is None:
            self.max_id = scan_max(self.tokens)
        return self.max_id

    # TokenStream's names, so code that reports on either stream needs no special case
    @property
    def doc_starts(self) -> np.ndarray:
        return self.example_starts

    @property
    def num_docs(self) -> int:
        return self.num_examples

    @classmethod
    def open(cls, directory: str | Path) -> InstructStream:
        """Map a complete cache directory written by `tokenize_instruct`."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
            n_tokens, n_examples = int(meta["num_tokens"]), int(meta["num_examples"])
            ok = (
                meta.get("format") == FORMAT_VERSION
                and n_tokens > 0
                and (directory / TOKENS_FILE).stat().st_size == 4 * n_tokens
                and (directory / TARGETS_FILE).stat().st_size == n_tokens
                and (directory / STARTS_FILE).stat().st_size == 8 * n_examples
            )
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise SnuggleError(f"{directory}: incomplete or corrupt instruction cache (delete it and re-run)")
        tokens = np.memmap(directory / TOKENS_FILE, dtype="<u4", mode="r", shape=(n_tokens,))  # (N,)
        targets = np.memmap(directory / TARGETS_FILE, dtype="u1", mode="r", shape=(n_tokens,))  # (N,)
        starts = np.fromfile(directory / STARTS_FILE, dtype="<i8")  # (E,)
        max_id = meta.get("max_id")  # absent from caches written before it was recorded: scanned on demand
        max_id = max_id if isinstance(max_id, int) else None
        return cls(tokens, targets, starts, int(meta["eos_id"]), directory, max_id)

    def __reduce__(self) -> tuple[Any, ...]:
        # as TokenStream: spawned DataLoader workers re-map the cache instead of pickling it
        if self.path is not None:
            return (InstructStream.open, (self.path,))
        return (
            InstructStream,
            (self.tokens, self.targets, self.example_starts, self.eos_id, None, self.max_id),
        )


# --- reading records --------------------------------------------------------------------------------------


_WS = re.compile(r"\s*")


def _json_records(path: Path) -> Iterator[tuple[Any, str]]:
    """Items of a JSON list, each located by the line it starts on; an object holding exactly one list
    (`{"data": [...]}`) is accepted too, its items located by index."""
    with open_binary(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SnuggleError(f"{path}: invalid UTF-8 at byte {e.start}") from None

    def bad(e: ValueError | RecursionError) -> SnuggleError:
        if isinstance(e, RecursionError):
            return SnuggleError(f"{path}:{line}: malformed JSON: nested too deeply")
        if not isinstance(e, json.JSONDecodeError):  # 5000-digit integers and the like
            return SnuggleError(f"{path}:{line}: malformed JSON: {brief(e, 120)}")
        hint = " (one object per line? name the file .jsonl)" if e.msg == "Extra data" else ""
        return SnuggleError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno}){hint}")

    pos = _WS.match(text).end()
    if not text.startswith("[", pos):
        data = parse_json(text, str(path))
        lists = [k for k, v in data.items() if isinstance(v, list)] if isinstance(data, dict) else []
        if len(lists) != 1:
            raise SnuggleError(
                f"{path}: expected a list of records, or an object holding exactly one list of records"
            )
        for i, obj in enumerate(data[lists[0]]):
            yield obj, f"{path}: item {i} of '{lists[0]}'"
        return
    # A top-level list is scanned item by item, so every record can be reported by its line.
    decoder = json.JSONDecoder()
    pos = _WS.match(text, pos + 1).end()
    line, seen = 1, 0
    if text.startswith("]", pos):
        pos = _WS.match(text, pos + 1).end()
    else:
        while True:
            line += text.count("\n", seen, pos)
            seen = pos
            try:
                obj, end = decoder.raw_decode(text, pos)
            except (ValueError, RecursionError) as e:
                raise bad(e) from None
            yield obj, f"{path}:{line}"
            pos = _WS.match(text, end).end()
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos = _WS.match(text, pos + 1).end()
                break
            else:
                line += text.count("\n", seen, pos)
                raise SnuggleError(f"{path}:{line}: malformed JSON: expected ',' or ']' after a record")
    if pos != len(text):
        raise SnuggleError(
            f"{path}:{text.count(chr(10), 0, pos) + 1}: malformed JSON: extra data after the list"
        )


def _parquet_records(path: Path) -> Iterator[tuple[Any, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    # a corrupt footer can hold column names that are not UTF-8: a decode error, not an ArrowException
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise SnuggleError(f"{path}: not a readable parquet file: {brief(e)}") from None
    names = schema.names
    columns = [c for c in _RECORD_FIELDS if c in names]
    if not columns:
        raise SnuggleError(
            f"{path}: no 'messages' or 'instruction'/'output' columns (columns: {', '.join(names)})"
        )
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            for rec in batch.to_pylist():
                # a column absent from this record's format is null in the table, not a field of it
                yield {k: v for k, v in rec.items() if v is not None}, f"{path}: row {row}"
                row += 1
    # as in sources._parquet_docs: corrupt pages are ArrowException or OSError, bad UTF-8 a decode error
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise SnuggleError(f"{path}: corrupt parquet data: {brief(e)}") from None


_RECORD_FIELDS = ("messages", "instruction", "input", "output", "system")


def _hf_records(path: Path, split: str | None) -> Iterator[tuple[Any, str]]:
    ds = open_hf_dataset(path, split)
    columns = [c for c in _RECORD_FIELDS if c in ds.column_names]
    if not columns:
        raise SnuggleError(
            f"{path}: no 'messages' or 'instruction'/'output' columns (columns: {', '.join(ds.column_names)})"
        )
    import pyarrow as pa

    where = f"{path} [{split}]" if split else str(path)
    row = 0
    try:
        for batch in ds.select_columns(columns).iter(batch_size=_PARQUET_BATCH_ROWS):
            for i in range(len(batch[columns[0]])):
                # as in parquet: a column absent from this record's format is null, not a field of it
                rec = {c: batch[c][i] for c in columns if batch[c][i] is not None}
                yield rec, f"{where}: row {row}"
                row += 1
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise SnuggleError(f"{path}: corrupt datasets directory: {brief(e)}") from None


_READERS = {".jsonl": iter_jsonl, ".json": _json_records, ".parquet": _parquet_records}


def _messages(obj: Any, where: str) -> Messages:
    """One record as a validated conversation."""
    if not isinstance(obj, dict):
        raise SnuggleError(
            f"{where}: expected a JSON object (a chat or Alpaca record), got {type(obj).__name__}"
        )
    if "messages" in obj:
        if "instruction" in obj or "output" in obj:
            raise SnuggleError(f"{where}: record has both 'messages' and Alpaca fields; use one format")
        return _chat(obj["messages"], where)
    if "instruction" in obj or "output" in obj:
        return _alpaca(obj, where)
    keys = ", ".join(sorted(map(str, obj))[:8]) or "none"
    raise SnuggleError(
        f"{where}: expected 'messages' or 'instruction' + 'output' fields (fields present: {keys})"
    )


def _alpaca(obj: dict[str, Any], where: str) -> Messages:
    for key in ("instruction", "output"):
        if obj.get(key) is None:  # null means absent, as in parquet and datasets columns
            raise SnuggleError(f"{where}: Alpaca record is missing '{key}'")
    for key in ("instruction", "input", "output", "system"):
        if obj.get(key) is not None:
            if not isinstance(obj[key], str):
                raise SnuggleError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
            check_text(obj[key], where, f"field '{key}'")
    if not obj["instruction"].strip():
        raise SnuggleError(f"{where}: empty 'instruction'")
    if not obj["output"].strip():
        raise SnuggleError(f"{where}: empty 'output' (nothing to train on)")
    user = obj["instruction"]
    if (obj.get("input") or "").strip():
        user = f"{user}\n\n{obj['input']}"
    msgs = [{"role": "system", "content": obj["system"]}] if (obj.get("system") or "").strip() else []
    return [*msgs, {"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]


def _chat(messages: Any, where: str) -> Messages:
    if not isinstance(messages, list):
        raise SnuggleError(f"{where}: 'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise SnuggleError(f"{where}: empty 'messages'")
    out: Messages = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SnuggleError(f"{where}: message {i} must be an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            shown = repr(role) if len(repr(role)) <= 40 else repr(role)[:40] + "..."
            raise SnuggleError(
                f"{where}: message {i} has unknown role {shown} (expected one of {', '.join(ROLES)})"
            )
        if not isinstance(content, str):
            raise SnuggleError(f"{where}: message {i} content must be a string, got {type(content).__name__}")
        check_text(content, where, f"message {i} content")
        if role == "assistant" and not content.strip():
            raise SnuggleError(f"{where}: message {i} is an empty assistant message")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise SnuggleError(f"{where}: no assistant message (nothing to train on)")
    first = next(i for i, m in enumerate(out) if m["role"] != "system")
    if out[first]["role"] == "assistant":
        # its prompt would be the bare template header: there is nothing it answers
        raise SnuggleError(f"{where}: message {first} is an assistant message with no user message before it")
    return out


def _iter_conversations(files: Sequence[Path], split: str | None) -> Iterator[tuple[Messages, str]]:
    for path in files:
        if path.is_dir():
            records = _hf_records(path, split)
        elif (reader := _READERS.get(file_kind(path))) is not None:
            records = reader(path)
        else:
            raise SnuggleError(
                f"unsupported instruction data file type '{path.suffix}': {path} (expected {_EXPECTED})"
            )
        for obj, where in records:
            yield _messages(obj, where), where


def check_conversations(files: Sequence[Path], split: str | None = None) -> None:
    """Read the first record of every file as tokenizing will: a wrong format or a record that is neither
    Alpaca nor chat is one error before a model is loaded (later records are checked as they are read)."""
    for path in files:
        with contextlib.closing(_iter_conversations([Path(path)], split)) as records:
            next(records, None)


# --- rendering --------------------------------------------------------------------------------------------


def resolve_template(tokenizer: Any, chat_template: str | None = None) -> str:
    """The template conversations are rendered with: `chat_template`, else the tokenizer's, else
    FALLBACK_TEMPLATE (training and `snuggle generate --chat` pick it the same way)."""
    return _template(tokenizer, chat_template)


def has_chat_template(tokenizer: Any) -> bool:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("default")
    return isinstance(tpl, str) and bool(tpl.strip())


def prompt_ids(tokenizer: Any, messages: Messages, template: str) -> list[int]:
    """Token ids of `messages` followed by the template's generation prompt, as training tokenized the
    prompts of its examples (no special tokens added but the BOS the fallback template gets there)."""
    text = _Renderer(tokenizer, template).render(messages, "the prompt", generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if template == FALLBACK_TEMPLATE and _adds_bos(tokenizer) and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def end_of_turn_ids(tokenizer: Any, template: str) -> set[int]:
    """Tokens that end an assistant turn: EOS, and the special token the template closes a reply with
    (`<|im_end|>`, `<|eot_id|>`, ...), found by rendering a one-turn conversation."""
    out = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    marker = "snuggle-reply-marker"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    r = _Renderer(tokenizer, template)
    try:
        text = r.render(messages, "end-of-turn probe")
    except SnuggleError:
        return out  # a template that needs more than one plain turn: EOS alone stops generation
    at = text.rfind(marker)
    tail = text[at + len(marker) :].lstrip(" ") if at >= 0 else ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    if ids and tokenizer.convert_ids_to_tokens(ids[0]) in r.specials:
        out.add(int(ids[0]))
    return out


def _template(tokenizer: Any, chat_template: str | None) -> str:
    if chat_template is not None:
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise SnuggleError("chat_template must be a non-empty Jinja template string")
        return chat_template
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):  # named templates: the default one renders conversations
        tpl = tpl.get("default")
    return tpl if isinstance(tpl, str) and tpl.strip() else FALLBACK_TEMPLATE


class _Renderer:
    """Renders conversations with one template and finds the character spans of assistant responses."""

    def __init__(self, tokenizer: Any, template: str) -> None:
        self.tokenizer = tokenizer
        self.template = template
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
            if tok.special:
                specials.add(tok.content)
        # longest first, so that "</s>" is not mistaken for a shorter token that ends it
        self.specials = tuple(sorted((s for s in specials if s), key=len, reverse=True))
        self.ignores_generation_prompt: bool | None = None  # probed at the first reply
        self.header: str | None = None  # the markup such a template writes before a reply

    def render(self, messages: Messages, where: str, generation_prompt: bool = False) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # Jinja errors, raise_exception() in templates, ...
            msg = " ".join(str(e).split())[:200]
            raise SnuggleError(f"{where}: the chat template cannot render this record ({msg})") from None
        if not isinstance(text, str):
            raise SnuggleError(f"{where}: the chat template rendered {type(text).__name__}, not text")
        return text

    def __call__(self, messages: Messages, where: str) -> tuple[str, list[tuple[int, int]]]:
        full = self.render(messages, where)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:k], where, generation_prompt=True)  # k >= 1: see _chat
            upto = self.render(messages[: k + 1], where)
            if not upto.startswith(prompt) or not full.startswith(upto):
                raise SnuggleError(
                    f"{where}: the chat template is not prefix-stable at message {k}: rendering the "
                    "conversation up to a reply does not extend the rendering of what precedes it (or "
                    "later turns re-render it), so the reply's tokens cannot be located; pass a "
                    "prefix-stable chat_template"
                )
            start, end = len(prompt), len(upto)
            if self.ignores_generation_prompt is None:
                self.ignores_generation_prompt = prompt == self.render(messages[:k], where)
            if self.ignores_generation_prompt:
                start = self._skip_header(upto, start, end, m["content"])
            end = start + len(self._trim(upto[start:end]))
            if end > start:
                spans.append((start, end))
        return full, spans

    def _skip_header(self, upto: str, start: int, end: int, content: str) -> int:
        """Where the reply starts in a template that ignores add_generation_prompt: the assistant header
        it writes as part of the turn (`<|im_start|>assistant\n`) would otherwise be a target, trained
        to be generated. Its markup before the reply's content is context, as a generation prompt is."""
        reply = content.strip()
        at = upto.find(reply, start, end) if reply else -1
        if at > start and upto[start:at].strip():
            if self.header is None:
                self.header = upto[start:at]
            return at
        return start

    def _trim(self, reply: str) -> str:
        """Drop whitespace the template writes after the special token that closes the turn."""
        stripped = reply.rstrip()
        return stripped if stripped != reply and stripped.endswith(self.specials) else reply


def _encode(
    tokenizer: Any, texts: list[str], spans: list[list[tuple[int, int]]], eos: int, bos: int | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids (L,) uint32 and target flags (L,) uint8 for each rendered example."""
    enc = tokenizer(
        texts,
        add_special_tokens=False,  # templates write their own BOS/special tokens, as apply_chat_template does
        return_offsets_mapping=True,
        return_attention_mask=False,
        verbose=False,  # no "longer than model_max_length" warning: truncation is the packer's business
    )
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
    }
    out = []
    for text, ids, offsets, sp in zip(texts, enc["input_ids"], enc["offset_mapping"], spans, strict=True):
        ids = np.asarray(ids, dtype=np.int64)  # (L,)
        bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # (L, 2) character span of each token
        target = np.zeros(ids.shape[0], dtype=bool)  # (L,)
        for start, end in sp:
            # overlap, not containment: a token fusing the template's separator with the reply's first
            # characters (" the" after "assistant") is how the reply starts, so it is trained on
            target |= (bounds[:, 1] > start) & (bounds[:, 0] < end)
        # EOS closes the example unless the template already did (ChatML models whose EOS is <|im_end|>
        # end with "<|im_end|>\n": trailing whitespace does not count)
        last = len(offsets)
        while last and not text[offsets[last - 1][0] : offsets[last - 1][1]].strip():
            last -= 1
        if not last or ids[last - 1] != eos:
            # a target only right after a reply's own last token: then it is what the model should say
            # next. After the template's end-of-turn token (Llama 3's <|eot_id|>, a target) the turn is
            # already closed, and generation stops there: EOS would be one more token to learn, which a
            # template writing "\n" after its end of turn (ChatML) never has
            last_is_target = bool(target[-1]) and int(ids[-1]) not in special if target.size else False
            ids, target = np.append(ids, eos), np.append(target, last_is_target)
        if bos is not None and ids[0] != bos:
            ids, target = np.insert(ids, 0, bos), np.insert(target, 0, False)
        out.append((ids.astype(np.uint32), target.astype(np.uint8)))
    return out


# --- the cache --------------------------------------------------------------------------------------------


def _cache_key(files: Sequence[Path], tokenizer: Any, template: str, split: str | None) -> str:
    payload = {
        "kind": "instruct",
        "format": FORMAT_VERSION,
        "files": file_stamps(files, split),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "template": template,
        "roles": ROLES,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return (
        bool(ids) and ids[0] == bos and len(ids) > len(tokenizer("a", add_special_tokens=False)["input_ids"])
    )


def _write_cache(
    files: Sequence[Path], tokenizer: Any, template: str, batch_examples: int, out: Path, split: str | None
) -> None:
    eos = int(tokenizer.eos_token_id)
    renderer = _Renderer(tokenizer, template)
    # Chat templates write BOS themselves when the model wants it; our fallback does not, so it gets the
    # tokenizer's usual BOS the way plain text would.
    bos = tokenizer.bos_token_id if template == FALLBACK_TEMPLATE and _adds_bos(tokenizer) else None
    tag = f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    names = (TOKENS_FILE, TARGETS_FILE, STARTS_FILE, META_FILE)
    tmp = {name: out / (name + tag) for name in names}
    try:
        n_tokens = n_examples = n_targets = 0
        max_id = eos
        with (
            open(tmp[TOKENS_FILE], "wb") as ft,
            open(tmp[TARGETS_FILE], "wb") as fm,
            open(tmp[STARTS_FILE], "wb") as fs,
        ):

            def flush(texts: list[str], spans: list[list[tuple[int, int]]]) -> None:
                nonlocal n_tokens, n_examples, n_targets, max_id
                encoded = _encode(tokenizer, texts, spans, eos, bos)
                starts = np.cumsum([0] + [ids.size for ids, _ in encoded[:-1]], dtype=np.int64) + n_tokens
                ids = np.concatenate([ids for ids, _ in encoded]).astype("<u4")  # (n,)
                max_id = max(max_id, int(ids.max()))
                ft.write(ids.tobytes())
                targets = np.concatenate([t for _, t in encoded])
                fm.write(targets.tobytes())
                fs.write(starts.astype("<i8").tobytes())
                n_tokens += int(sum(ids.size for ids, _ in encoded))
                n_examples += len(encoded)
                n_targets += int(targets.sum())

            texts: list[str] = []
            spans: list[list[tuple[int, int]]] = []
            for messages, where in _iter_conversations(files, split):
                text, sp = renderer(messages, where)
                texts.append(text)
                spans.append(sp)
                if len(texts) >= batch_examples:
                    flush(texts, spans)
                    texts, spans = [], []
            if texts:
                flush(texts, spans)
        if not n_examples:
            names_ = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
            raise SnuggleError(f"no instruction records in {len(files)} file(s) ({names_})")
        if not n_targets:
            raise SnuggleError("the chat template left no response tokens to train on (empty replies?)")
        if renderer.header is not None:
            warnings.warn(
                f"the chat template ignores add_generation_prompt: the markup it writes before each reply "
                f"({renderer.header!r}) is context, not a target, but prompts at generate/eval time will "
                "lack it; pass a chat_template whose generation prompt writes it",
                stacklevel=2,
            )
        meta = {
            "format": FORMAT_VERSION,
            "num_tokens": n_tokens,
            "num_examples": n_examples,
            "num_target_tokens": n_targets,
            "eos_id": eos,
            "max_id": max_id,
            "template": template,
            "files": [str(p) for p in files],
        }
        tmp[META_FILE].write_text(json.dumps(meta, indent=1), encoding="utf-8")
        commit_cache_files(tmp, out, names)  # names end with meta.json: its presence marks a complete cache
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)


def tokenize_instruct(
    files: str | Path | Sequence[str | Path],
    tokenizer: Any,
    *,
    cache_dir: str | Path,
    chat_template: str | None = None,
    batch_examples: int = 64,
    split: str | None = None,
) -> InstructStream:
    """Render and tokenize instruction records into `cache_dir/<sha256 key>/`, or reuse that cache.

    `chat_template` (a Jinja string) overrides the tokenizer's template; without either, records are
    rendered with `FALLBACK_TEMPLATE`. See the module docstring for what is a target. `split` picks the
    split of DatasetDict directories among `files` (default train).
    """
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise SnuggleError("the tokenizer has no eos_token: set one so that examples can be separated")
    if not getattr(tokenizer, "is_fast", False):
        raise SnuggleError("instruction data needs a fast tokenizer (token offsets locate the replies)")
    if batch_examples < 1:
        raise SnuggleError(f"batch_examples must be >= 1, got {batch_examples}")
    if isinstance(files, str | os.PathLike):
        files = [files]  # one path, not a sequence of characters
    paths = [Path(f).resolve() for f in files]
    if not paths:
        raise SnuggleError("no training files given")
    for p in paths:
        if file_kind(p) not in SUFFIXES and not is_hf_dataset_dir(p):
            raise SnuggleError(
                f"unsupported instruction data file type '{p.suffix}': {p} (expected {_EXPECTED})"
            )
    template = _template(tokenizer, chat_template)
    out = Path(cache_dir) / _cache_key(paths, tokenizer, template, split)
    if (out / META_FILE).exists():
        try:
            return InstructStream.open(out)
        except SnuggleError:
            pass  # a damaged cache under the right key is simply rebuilt
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_cache(paths, tokenizer, template, batch_examples, out, split)
    except BaseException as e:
        with contextlib.suppress(OSError):
            out.rmdir()  # only succeeds if empty: leave no empty cache directory behind after bad input
        if is_cache_write(e, out):
            raise cache_write_error(out, e) from None
        raise
    return InstructStream.open(out)


# --- packing ----------------------------------------------------------------------------------------------


class PackedExamples:
    """Rows of `seq_len` tokens holding whole examples; `rows[i]` is a dict of (T,) int64 tensors.

    Same keys and conventions as `PackedRows`: `labels[t]` is the target at position t (the next token
    when that token is a response target of the same example, else IGNORE_INDEX), `position_ids` restart
    at each example, `doc_ids` are equal exactly within one example (padding gets its own id), so no
    example attends to another. Examples are packed in order (next-fit); one longer than `seq_len` gets a
    row of its own holding its first `seq_len` tokens (its targets beyond are lost; a warning counts them).
    An example with no target inside that row (a prompt longer than `seq_len`) is left out, with a warning
    counting them: its row would train on nothing, and a step of such rows would log a loss of 0.
    """

    def __init__(self, stream: InstructStream, seq_len: int) -> None:
        if seq_len < 2:
            raise SnuggleError(f"seq_len must be >= 2, got {seq_len}")
        self.stream = stream
        self.seq_len = seq_len
        starts = np.asarray(stream.example_starts, dtype=np.int64)  # (E,)
        lengths = np.diff(np.append(starts, len(stream)))  # (E,)
        reachable = self._has_targets(stream, starts, lengths, seq_len)  # (E,)
        row_start: list[int] = []
        row_len: list[int] = []
        cur_start, cur_len = 0, 0
        truncated = 0
        for s, n, keep in zip(starts.tolist(), lengths.tolist(), reachable.tolist(), strict=True):
            if not keep:
                continue  # no reply token within its row: it would only add a loss-free row
            if cur_len and cur_len + n > seq_len:
                row_start.append(cur_start)
                row_len.append(cur_len)
                cur_len = 0
            if n >= seq_len:  # a row of its own, cut to seq_len tokens
                truncated += n > seq_len
                row_start.append(s)
                row_len.append(seq_len)
                continue
            if not cur_len:
                cur_start = s
            cur_len += n
        if cur_len:
            row_start.append(cur_start)
            row_len.append(cur_len)
        self._row_start = np.asarray(row_start, dtype=np.int64)  # (R,) stream offset of each row
        self._row_len = np.asarray(row_len, dtype=np.int64)  # (R,) real (non-padding) tokens per row
        self.num_truncated = truncated
        self.num_dropped = int((~reachable).sum())
        if self.num_dropped == stream.num_examples:
            raise SnuggleError(
                f"none of the {stream.num_examples} instruction examples has a reply token within its "
                f"first seq_len={seq_len} tokens (the prompts alone fill the rows): raise data.seq_len"
            )
        if self.num_dropped:
            warnings.warn(
                f"{self.num_dropped} of {stream.num_examples} instruction examples have no reply token "
                f"within their first seq_len={seq_len} tokens (the prompt alone fills the row) and are "
                "left out; raise seq_len to keep them",
                stacklevel=2,
            )
        if truncated:
            warnings.warn(
                f"{truncated} of {stream.num_examples} instruction examples are longer than "
                f"seq_len={seq_len} and were truncated (their tokens past seq_len are not trained on); "
                "raise seq_len to keep them",
                stacklevel=2,
            )

    @staticmethod
    def _has_targets(
        stream: InstructStream, starts: np.ndarray, lengths: np.ndarray, seq_len: int
    ) -> np.ndarray:
        """(E,) bool: whether an example has a label inside the row it would get. Position p > 0 of an
        example is a label (of position p - 1) when it is a target; an example cut to seq_len keeps the
        labels at positions 1..seq_len (the token just past its row is the label of the row's last)."""
        if not starts.size:
            return np.zeros(0, dtype=bool)
        targets = stream.targets
        # targets at positions 1..n-1 of every example: its sum less its first token's
        per_example = np.add.reduceat(targets, starts, dtype=np.int64) - np.asarray(targets[starts])
        out = per_example > 0  # (E,)
        for e in np.flatnonzero(out & (lengths > seq_len)):
            s = int(starts[e])
            out[e] = bool(np.any(targets[s + 1 : s + seq_len + 1]))
        return out

    def __len__(self) -> int:
        return int(self._row_start.shape[0])

    @property
    def fill(self) -> float:
        """Share of row positions holding real tokens (the rest is padding)."""
        return float(self._row_len.sum()) / (len(self) * self.seq_len) if len(self) else 0.0

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        T, stream = self.seq_len, self.stream
        s, n = int(self._row_start[i]), int(self._row_len[i])
        # one token past the row: the next token of a truncated example is still its target
        window = np.asarray(stream.tokens[s : s + n + 1], dtype=np.int64)  # (L,) L <= n+1
        is_target = np.asarray(stream.targets[s : s + n + 1], dtype=bool)  # (L,)
        L = window.shape[0]
        pos = s + np.arange(L)  # (L,) stream offsets
        ex = np.searchsorted(stream.example_starts, pos, side="right") - 1  # (L,) example of each token

        input_ids = np.full(T, stream.eos_id, dtype=np.int64)  # (T,)
        input_ids[:n] = window[:n]
        labels = np.full(T, IGNORE_INDEX, dtype=np.int64)  # (T,)
        m = min(L - 1, n)
        keep = (ex[1 : m + 1] == ex[:m]) & is_target[1 : m + 1]  # (m,)
        labels[:m] = np.where(keep, window[1 : m + 1], IGNORE_INDEX)
        position_ids = np.empty(T, dtype=np.int64)  # (T,)
        position_ids[:n] = pos[:n] - stream.example_starts[ex[:n]]
        position_ids[n:] = np.arange(T - n)
        doc_ids = np.empty(T, dtype=np.int64)  # (T,)
        doc_ids[:n] = ex[:n] - ex[0]
        doc_ids[n:] = doc_ids[n - 1] + 1  # padding: one id of its own, never a real example's
        return row_tensors(input_ids, labels, position_ids, doc_ids)

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Collated (B, T) batch of the given row indices."""
        return collate([self[i] for i in indices])
