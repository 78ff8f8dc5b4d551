"""docs/config.md is the config's public reference: every key of every section, with its real default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from snuggle import config as C

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
SECTIONS = {"model": C.ModelConfig, "lora": C.LoraConfig, "data": C.DataConfig, "train": C.TrainConfig}


def documented() -> dict[str, dict[str, str]]:
    """{section: {key: the default column's text}} from the tables under each `## section` heading."""
    out: dict[str, dict[str, str]] = {}
    section = None
    for line in DOC.read_text().splitlines():
        if m := re.match(r"^## (\w+)", line):
            section = m.group(1)
            out.setdefault(section, {})
        elif section and (m := re.match(r"^\| `([a-z_0-9]+)` \| ([^|]*) \|", line)):
            out[section][m.group(1)] = m.group(2).strip()
    return out


def default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_config_key_is_documented_and_no_other(section):
    fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
    keys = set(documented().get(section, {}))
    assert fields - keys == set(), f"keys missing from docs/config.md [{section}]"
    assert keys - fields == set(), f"docs/config.md [{section}] names keys the config does not have"


@pytest.mark.parametrize("section", list(SECTIONS))
def test_documented_defaults_are_the_real_ones(section):
    docs = documented()[section]
    for f in dataclasses.fields(SECTIONS[section]):
        text = docs[f.name]
        if text == "required":  # no usable default: the dataclass holds an empty placeholder
            assert default_of(f) in ("", None), f.name
            continue
        m = re.fullmatch(r"`([^`]*)`.*", text)
        assert m, f"{section}.{f.name}: default column {text!r} is not a `value`"
        # read as a user's override would be (snuggle's YAML rules: `2e-4` is a float here)
        required = ["model.path=m", "data.train=d"]  # the two keys without defaults
        cfg = C.load_config(None, [*required, f"{section}.{f.name}={m.group(1)}"])
        assert getattr(getattr(cfg, section), f.name) == default_of(f), f"{section}.{f.name}"
