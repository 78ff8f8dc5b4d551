"""RunConfig: YAML + dotted overrides, type checks that name the key, validation bounds. No model needed."""

from __future__ import annotations

import dataclasses

import pytest

from snuggle.config import (
    CURVE,
    DataConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    curve_keys,
    load_config,
    to_dict,
)
from snuggle.errors import SnuggleError

# the two keys validate() insists on; everything else has a default
REQUIRED = ["model.path=/models/tiny", "data.train=corpus.jsonl"]


def cfg_of(*overrides: str, path=None) -> RunConfig:
    return load_config(path, [*REQUIRED, *overrides])


def error_of(*overrides: str, path=None) -> str:
    with pytest.raises(SnuggleError) as ei:
        cfg_of(*overrides, path=path)
    return str(ei.value)


def test_yaml_file_then_overrides_win(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(
        "model:\n  path: /models/a\n  dtype: float32\n"
        "lora:\n  r: 8\n  alpha: 16\n  targets: [q_proj, v_proj]\n"
        "data:\n  train: [a.txt, b.jsonl]\n  seq_len: 64\n"
        "train:\n  steps: 10\n  lr: 3.0e-4\n  betas: [0.9, 0.95]\n"
    )
    cfg = load_config(f, ["train.steps=20", "model.path=/models/b"])
    assert cfg.model == dataclasses.replace(cfg.model, path="/models/b", dtype="float32")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.targets) == (8, 16.0, ["q_proj", "v_proj"])
    assert isinstance(cfg.lora.alpha, float)  # YAML int 16 coerced to the float field
    assert cfg.data.train == ["a.txt", "b.jsonl"] and cfg.data.seq_len == 64
    assert (cfg.train.steps, cfg.train.lr, cfg.train.betas) == (20, 3e-4, [0.9, 0.95])
    # untouched keys keep their defaults
    assert cfg.train.batch_size == 1 and cfg.data.text_field == "text" and cfg.use_lora


def test_overrides_parse_values_as_yaml():
    cfg = cfg_of(
        "train.lr=1",  # int -> float
        "train.betas=[0, 0.5]",  # list, ints inside coerced
        "train.embedding_lr=2",
        "train.max_grad_norm=null",
        "train.eval_rows=null",
        "train.schedule=linear",
        "lora.targets=[q_proj, down_proj]",
        "lora.rslora=true",
        "data.cache_dir=null",
    )
    t = cfg.train
    assert t.lr == 1.0 and type(t.lr) is float
    assert t.betas == [0.0, 0.5] and all(type(b) is float for b in t.betas)
    assert t.embedding_lr == 2.0 and type(t.embedding_lr) is float
    assert t.max_grad_norm is None and t.eval_rows is None and t.schedule == "linear"
    assert cfg.lora.targets == ["q_proj", "down_proj"] and cfg.lora.rslora is True
    assert cfg.data.cache_dir is None


@pytest.mark.parametrize(
    ("raw", "value"), [("1e-4", 1e-4), ("5E-5", 5e-5), ("1.0e1", 10.0), ("-2e-3", None), ("2.0e-4", 2e-4)]
)
def test_scientific_notation_is_a_float(raw, value, tmp_path):
    # PyYAML reads `1e-4` (no dot) as a string; a float field must still take it, from a file too
    if value is None:  # negative: a number, so the message is about the bound, not the type
        assert "train.lr and train.embedding_lr must be > 0" in error_of(f"train.lr={raw}")
        return
    assert cfg_of(f"train.lr={raw}").train.lr == value
    f = tmp_path / "c.yaml"
    f.write_text(f"train:\n  embedding_lr: {raw}\n")
    assert cfg_of(path=f).train.embedding_lr == value


def test_scientific_string_is_not_coerced_for_other_types():
    # only float fields take the spelling; a str field keeps the string, an int field refuses it
    assert cfg_of("model.dtype=1e-4").model.dtype == "1e-4"
    assert "config key 'train.steps' must be int, got '1e3'" in error_of("train.steps=1e3")


def test_empty_override_value_is_an_empty_string():
    # `key=` gives "" (not None), and for data.train that is the "required" error, not a crash
    assert error_of("data.train=") == "data.train is required"


def test_string_override_that_is_not_yaml_is_kept_verbatim():
    assert cfg_of("model.path=[unclosed").model.path == "[unclosed"


@pytest.mark.parametrize(
    ("override", "key", "known"),
    [
        ("train.foo=1", "train.foo", "grad_accum"),
        ("lora.rank=8", "lora.rank", "train_embeddings"),
        ("foo=1", "foo", "model, lora, data, train"),
        ("data.seqlen=3", "data.seqlen", "seq_len"),
    ],
)
def test_unknown_key_is_named(override, key, known):
    msg = error_of(override)
    assert msg.startswith(f"unknown config key '{key}';")
    assert known in msg.partition("known: ")[2]  # the keys that section does have, for the typo


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("train.stpes=3", "train.steps"),
        ("data.seqlen=3", "data.seq_len"),
        ("trian.steps=3", "train"),
        ("lora.alpah=8", "lora.alpha"),
        ("train.Lr=0.1", "train.lr"),
    ],
)
def test_a_mistyped_key_gets_a_did_you_mean(override, hint):
    assert f"did you mean '{hint}'? known: " in error_of(override)


def test_a_key_close_to_nothing_gets_no_guess():
    assert "did you mean" not in error_of("train.zzzzzz=1")


def test_unknown_key_in_yaml_file_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  path: /m\ndata:\n  train: x.txt\ntrain:\n  stpes: 3\n")
    with pytest.raises(SnuggleError, match=r"unknown config key 'train\.stpes'"):
        load_config(f)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.steps=ten", "config key 'train.steps' must be int, got 'ten'"),
        ("train.steps=2.5", "config key 'train.steps' must be int, got 2.5"),
        ("train.steps=true", "config key 'train.steps' must be int, got True"),
        ("train.lr=fast", "config key 'train.lr' must be float"),
        ("train.lr=true", "config key 'train.lr' must be float"),
        ("train.resume=1", "config key 'train.resume' must be bool | 'auto', got 1"),
        ("train.betas=0.9", "config key 'train.betas' must be list[float]"),
        ("train.betas=[0.9, x]", "config key 'train.betas' must be list[float]"),
        ("train.schedule=step", "config key 'train.schedule' must be 'cosine' | 'linear' | 'constant'"),
        ("data.seq_len=null", "config key 'data.seq_len' must be int, got None"),
        ("data.train=5", "config key 'data.train'"),
        ("lora.targets=[1, 2]", "config key 'lora.targets'"),
        ("train=5", "config key 'train'"),
        ("train.lr.x=1", "config key 'train.lr' must be float"),
    ],
)
def test_wrong_type_is_named(override, fragment):
    assert fragment in error_of(override)


def test_lora_null_means_full_finetuning(tmp_path):
    assert cfg_of("lora=null").use_lora is False
    assert cfg_of("lora.enabled=false").use_lora is False
    assert cfg_of().use_lora is True
    f = tmp_path / "c.yaml"
    f.write_text("lora: null\n")
    cfg = cfg_of(path=f)
    assert cfg.use_lora is False
    # a disabled LoRA section is not validated: lora.r=0 does not matter when LoRA is off
    assert cfg_of("lora.enabled=false", "lora.r=0").use_lora is False


def test_config_from_dict_lora_none():
    cfg = config_from_dict({"model": {"path": "/m"}, "data": {"train": "x"}, "lora": None})
    assert cfg.lora == LoraConfig(enabled=False) and not cfg.use_lora


def test_to_dict_round_trips():
    cfg = cfg_of("lora.r=4", "train.betas=[0.8, 0.9]", "data.train=[a, b]", "train.embedding_lr=1e-5")
    assert config_from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.steps=0", "train.steps must be >= 1, got 0"),
        ("train.steps=-3", "train.steps must be >= 1"),
        ("train.batch_size=0", "train.batch_size must be >= 1"),
        ("train.grad_accum=0", "train.grad_accum must be >= 1"),
        ("data.seq_len=1", "data.seq_len must be >= 2"),
        ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
        ("train.eval_every=-1", "train.eval_every must be >= 0"),
        ("train.save_every=-1", "train.save_every must be >= 0"),
        ("train.log_every=0", "train.log_every must be >= 1"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1"),
        ("data.val_fraction=1.0", "data.val_fraction must be in [0, 1)"),
        ("data.val_fraction=-0.1", "data.val_fraction must be in [0, 1)"),
        ("train.lr=0", "train.lr and train.embedding_lr must be > 0"),
        ("train.embedding_lr=0", "train.lr and train.embedding_lr must be > 0"),
        # 1e38 passed, then torch's AdamW overflowed in its first step with a traceback
        ("train.lr=1e38", "train.lr=1e+38 is above 10: AdamW steps that large do not train"),
        ("train.embedding_lr=11", "train.embedding_lr=11 is above 10"),
        ("train.betas=[0.9]", "train.betas must be a list of two numbers"),
        ("train.betas=[0.9, 1.0]", "train.betas must be a list of two numbers in [0, 1)"),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0"),
        ("train.min_lr_ratio=1.5", "train.min_lr_ratio must be in [0, 1]"),
        ("train.min_lr_ratio=-0.1", "train.min_lr_ratio must be in [0, 1]"),
        ("train.max_grad_norm=-1", "train.max_grad_norm must be >= 0"),
        ("train.eval_rows=0", "train.eval_rows must be >= 1"),
        ("lora.r=0", "lora.r must be >= 1, got 0"),
        ("lora.alpha=0", "lora.alpha must be > 0"),
        ("lora.dropout=1.0", "lora.dropout must be in [0, 1)"),
        ("lora.dropout=-0.1", "lora.dropout must be in [0, 1)"),
        ("model.path=", "model.path is required"),
        ("model.adapter=", "model.adapter is empty: give a path, or null for none"),
        ("data.cache_dir=' '", "data.cache_dir is empty"),
    ],
)
def test_validation_bounds(override, fragment):
    assert fragment in error_of(override)


@pytest.mark.parametrize(
    "override",
    [
        "train.steps=1",
        "data.val_fraction=0",
        "data.val_fraction=0.99",
        "train.min_lr_ratio=1",
        "train.max_grad_norm=0",
        "train.eval_rows=1",
        "lora.dropout=0.5",
        "train.betas=[0, 0.999]",
    ],
)
def test_values_at_the_bounds_are_accepted(override):
    cfg_of(override)  # would raise SnuggleError


def test_missing_required_keys():
    with pytest.raises(SnuggleError, match="model.path is required"):
        load_config(None, ["data.train=x"])
    with pytest.raises(SnuggleError, match="data.train is required"):
        load_config(None, ["model.path=/m"])


@pytest.mark.parametrize("override", ["train.steps", "train.steps:5", "=5", ""])
def test_override_without_equals_is_rejected(override):
    with pytest.raises(SnuggleError, match=r"must look like section\.key=value"):
        load_config(None, [*REQUIRED, override])


def test_invalid_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  path: [unclosed\n")
    with pytest.raises(SnuggleError, match="invalid YAML") as ei:
        load_config(f)
    assert str(f) in str(ei.value) and "\n" not in str(ei.value)


def test_yaml_that_is_not_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(SnuggleError, match="must be a YAML mapping"):
        load_config(f)


def test_unreadable_config_file(tmp_path):
    with pytest.raises(SnuggleError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(SnuggleError, match="cannot read config"):
        load_config(tmp_path)  # a directory


def test_empty_yaml_file_is_all_defaults(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("")
    cfg = load_config(f, REQUIRED)
    assert cfg == config_from_dict({"model": {"path": "/models/tiny"}, "data": {"train": "corpus.jsonl"}})
    assert cfg.train == RunConfig().train


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        # a second section silently replaced the first: its lr and output_dir were lost
        (
            "model: {path: /m}\ntrain: {steps: 1, lr: 1.0e-2}\ndata: {train: c.txt}\ntrain:\n  steps: 2\n",
            "'train'",
            (4, 2),
        ),
        ("model: {path: /m, path: /n}\ndata: {train: c.txt}\n", "'path'", (1, 1)),
        ("model: {path: /m}\ndata:\n  train: c.txt\n  seq_len: 64\n  seq_len: 128\n", "'seq_len'", (5, 4)),
        ("model: {path: /m}\ndata: {train: [{a: 1, a: 2}]}\n", "'a'", (2, 2)),
    ],
    ids=["section", "flow-key", "block-key", "in-a-list"],
)
def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path, text, key, lines):
    f = tmp_path / "dup.yaml"
    f.write_text(text)
    with pytest.raises(SnuggleError) as ei:
        load_config(f)
    msg = str(ei.value)
    assert f"{f}:{lines[0]}: key {key} given twice" in msg and f"first at line {lines[1]}" in msg, msg


def test_repeated_keys_in_different_mappings_and_merge_keys_are_fine(tmp_path):
    f = tmp_path / "ok.yaml"
    f.write_text(
        "base: &b {dtype: float32}\n"
        "model: {<<: *b, path: /m}\n"
        "data: {train: c.txt, seq_len: 64}\n"
        "train: {steps: 3, seq: null}\n"
    )
    # the unknown keys are refused as such, not as duplicates: `path`/`steps` repeat across mappings only
    with pytest.raises(SnuggleError, match="unknown config key 'base'"):
        load_config(f)
    f.write_text("model: {path: /m}\nlora: {r: 8}\ndata: {train: c.txt}\ntrain: {steps: 3}\n")
    assert load_config(f).lora.r == 8


def test_a_mapping_override_sets_its_keys_and_keeps_the_others(tmp_path):
    # `train={steps: 3}` replaced the whole section: the file's lr and output_dir fell back to the defaults
    f = tmp_path / "run.yaml"
    f.write_text(
        "model: {path: /m}\nlora: {r: 4, alpha: 8}\ndata: {train: c.txt, seq_len: 64}\n"
        "train: {lr: 3.0e-4, output_dir: runs/mine, steps: 10}\n"
    )
    cfg = load_config(f, ["train={steps: 3, batch_size: 2}", "lora={r: 2}", "data={seq_len: 32}"])
    assert (cfg.train.steps, cfg.train.batch_size) == (3, 2)
    assert (cfg.train.lr, cfg.train.output_dir) == (3e-4, "runs/mine")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.data.seq_len, cfg.data.train) == (2, 8.0, 32, "c.txt")
    assert load_config(f, ["lora=null"]).use_lora is False  # null still replaces the section
    assert load_config(f, ["lora=null", "lora={r: 2}"]).lora.alpha == 16.0  # nothing left to keep
    with pytest.raises(SnuggleError, match="unknown config key 'train.stpes'"):
        load_config(f, ["train={stpes: 3}"])


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.global_batch=8", "train.global_batch_tokens=64"], "not both"),
        (["train.global_batch=8", "train.grad_accum=2"], "both size the step: set one"),
        (["train.global_batch=0"], "train.global_batch must be >= 1"),
        (
            ["train.global_batch_tokens=100", "data.seq_len=16"],
            "not a whole number of rows of data.seq_len=16",
        ),
        (["train.max_restarts=-1"], "train.max_restarts must be >= 0"),
        (["train.max_restarts=2"], "set train.resume=auto"),
        (["train.resume=maybe"], "train.resume"),
    ],
)
def test_world_size_free_and_restart_settings_are_checked(overrides, fragment):
    assert fragment in error_of(*overrides)


def test_resume_auto_and_a_global_batch_are_accepted():
    cfg = cfg_of(
        "train.resume=auto", "train.max_restarts=3", "train.global_batch_tokens=128", "data.seq_len=16"
    )
    assert (cfg.train.resume, cfg.train.max_restarts, cfg.train.global_batch_tokens) == ("auto", 3, 128)
    assert cfg_of("train.resume=true", "train.max_restarts=1").train.resume is True


# --- which fields shape the loss curve ---------------------------------------------------------------

SECTIONS = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig}


@pytest.mark.parametrize("section", SECTIONS)
def test_every_field_says_whether_it_shapes_the_loss_curve(section):
    """A new field takes curve_field(...) or run_field(...) (see snuggle.config): the resume fingerprint
    is built from that mark, so an unmarked field would be silently left out of it."""
    unmarked = [
        f.name for f in dataclasses.fields(SECTIONS[section]) if not isinstance(f.metadata.get(CURVE), bool)
    ]
    assert unmarked == [], f"{section}: mark these with curve_field or run_field: {unmarked}"


def test_the_resume_fingerprint_is_the_curve_fields():
    from snuggle.train.checkpoint import curve_fingerprint

    fp = curve_fingerprint(cfg_of(), "float32", 8)  # LoRA on, a decaying schedule: every curve field counts
    marked = {f"{s}.{name}" for s, cls in SECTIONS.items() for name in curve_keys(cls)}
    assert set(fp) == marked | {"train.global_batch"}
    assert "train.output_dir" not in marked and "train.lr" in marked
    off = curve_fingerprint(cfg_of("lora.enabled=false", "train.schedule=constant"), "float32", 8)
    assert not any(k.startswith("lora.") and k != "lora.enabled" for k in off) and "train.steps" not in off
