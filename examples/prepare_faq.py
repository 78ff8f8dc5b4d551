"""Turn the shipped Debian FAQ (Italian) into question -> answer records for instruction tuning.

usage: python examples/prepare_faq.py TRAIN.jsonl HELDOUT.jsonl

Every numbered FAQ entry whose title is a question ("7.12. Come si blocca un pacchetto?") becomes one
Alpaca record: `instruction` is the question, `output` the text the FAQ gives under it, up to the next
numbered heading. Entries titled by a topic rather than a question ("8.1.1. dpkg", "16.1. Autori") are
left out, so every record is a real question with the FAQ's own answer. The text is the plain-text
rendering in Debian's package `debian-faq-it`, hard-wrapped at 70 columns: each paragraph is re-joined
into one line (line breaks inside URLs and after '/' are the renderer's and are closed up), bullets stay
one per line, commands and program output (never wrapped) keep their lines, and nothing else is changed.
HELD_OUT questions go to HELDOUT.jsonl and never to training.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

SRC = Path(__file__).parent / "data" / "debian-faq.it.txt.gz"
# the held-out question the demo asks before and after instruction tuning
HELD_OUT = ("Come si può sapere quali pacchetti sono già installati su un sistema Debian?",)
# "1.1. Title" or "3.1.12. Title", numbers at column 0 (the rendering separates them with a no-break space)
HEADING = re.compile(r"^(\d+(?:\.\d+)+)\.\s+(\S.*)$")
CHAPTER = re.compile(r"^(Capitolo|Appendice)\s")
PREFORMATTED = ("$ ", "# ", "deb ", "deb-src ")
WRAP = 70  # the rendering's line width: a longer line was never wrapped


def _join(lines: list[str]) -> str:
    out = ""
    for ln in lines:
        ln = ln.strip()
        if not out:
            out = ln
        # the renderer breaks long words after '/' (URLs, "GNU/Linux") and after a word's own hyphen
        elif out.endswith("/") or re.search(r"\w-$", out):
            out += ln
        else:
            out += " " + ln
    return out


def _preformatted(block: list[str]) -> bool:
    """Commands, sources.list lines and program output: never wrapped by the renderer, kept as they are."""
    first = block[0].strip()
    return first.startswith(PREFORMATTED) or any(len(ln) > WRAP or "  " in ln.strip() for ln in block)


def _paragraph(block: list[str]) -> str:
    """One paragraph (no blank lines): prose re-joined, each bullet item on its own line."""
    if _preformatted(block):
        indent = min(len(ln) - len(ln.lstrip()) for ln in block)
        return "\n".join(ln[indent:].rstrip() for ln in block)
    items: list[list[str]] = []
    for ln in block:
        if not items or ln.strip().startswith("* "):
            items.append([ln])
        else:
            items[-1].append(ln)
    return "\n".join(_join(item) for item in items)


def _answer(body: list[str]) -> str:
    paragraphs, cur = [], []
    for ln in [*body, ""]:
        if ln.strip():
            cur.append(ln.replace("\u00a0", " "))
        elif cur:
            paragraphs.append(_paragraph(cur))
            cur = []
    return "\n\n".join(paragraphs)


def records(text: str) -> list[dict[str, str]]:
    lines = text.splitlines()
    # the body starts at the first chapter; what precedes it is the copyright notice and the contents
    start = next(i for i, ln in enumerate(lines) if re.match(r"^Capitolo\s1\.", ln))
    heads = [i for i in range(start, len(lines)) if HEADING.match(lines[i].replace("\u00a0", " "))]
    out = []
    for k, i in enumerate(heads):
        j, title = i, []
        while lines[j].strip():  # a long title wraps onto the following lines
            title.append(lines[j].replace("\u00a0", " ").strip())
            j += 1
        question = HEADING.match(" ".join(title)).group(2)
        end = heads[k + 1] if k + 1 < len(heads) else len(lines)
        body = lines[j:end]
        cut = next((n for n, ln in enumerate(body) if CHAPTER.match(ln)), len(body))
        answer = _answer(body[:cut])
        if question.endswith("?") and answer:
            out.append({"instruction": question, "output": answer})
    return out


def main() -> None:
    train_out, held_out = Path(sys.argv[1]), Path(sys.argv[2])
    train_out.parent.mkdir(parents=True, exist_ok=True)
    recs = records(gzip.decompress(SRC.read_bytes()).decode("utf-8"))
    missing = set(HELD_OUT) - {r["instruction"] for r in recs}
    if missing:
        sys.exit(f"held-out question(s) not found in the FAQ: {sorted(missing)}")
    for path, keep in ((train_out, False), (held_out, True)):
        with open(path, "w", encoding="utf-8") as fh:
            for r in recs:
                if (r["instruction"] in HELD_OUT) == keep:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    n_held = len(HELD_OUT)
    chars = sum(len(r["instruction"]) + len(r["output"]) for r in recs)
    print(
        f"{len(recs)} questions ({chars:,} characters): "
        f"{len(recs) - n_held} -> {train_out}, {n_held} -> {held_out}"
    )


if __name__ == "__main__":
    main()
