"""Tests for cll.config: defaults, fractions, one-line validation errors, YAML files and --set."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from cll.config import (
    KEYS,
    REQUIRED,
    RunConfig,
    build_config,
    default,
    describe,
    load_config,
    markdown_table,
    parse_number,
    parse_overrides,
    rule,
)
from cll.errors import ConfigError
from cll.values import NUMBER_TEXT

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "moons.yaml"
BASE = {"dataset": "moons", "arch": "moons-mlp", "loss": "cll"}


def config_error(values) -> str:
    """The message of the ConfigError that ``build_config(values)`` raises, checked to be one line."""
    with pytest.raises(ConfigError) as info:
        build_config(values)
    msg = str(info.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


# ------------------------------------------------------------------------------ defaults
def test_defaults_fill_every_other_key():
    cfg = build_config(dict(BASE))
    assert (cfg.dataset, cfg.arch, cfg.loss) == ("moons", "moons-mlp", "cll")
    assert cfg.eps == 0.15
    assert cfg.p == 0.3
    assert cfg.delta is None
    assert cfg.lip_penalty == 1e-4
    assert cfg.optimizer == "adamw"
    assert cfg.lr == 1e-3
    assert cfg.epochs == 801
    assert cfg.batch_size == 128
    assert cfg.betas == [0.9, 0.999]
    assert cfg.schedule == "multistep"
    assert cfg.milestones is None
    assert cfg.max_train is None and cfg.max_test is None
    assert cfg.device == "auto"
    assert cfg.certify_eps == [36 / 255, 72 / 255, 108 / 255]
    # every key not given has exactly the documented dataclass default
    for f in dataclasses.fields(RunConfig):
        if f.name in BASE:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert getattr(cfg, f.name) == default, f.name


def test_default_lists_are_not_shared():
    a, b = build_config(dict(BASE)), build_config(dict(BASE))
    a.certify_eps.append(1.0)
    a.betas[0] = 0.5
    assert b.certify_eps == [36 / 255, 72 / 255, 108 / 255]
    assert b.betas == [0.9, 0.999]


def test_resolved_config_round_trips():
    """A checkpoint stores cfg.to_dict(); build_config must accept it back unchanged (load_run)."""
    cfg = build_config(
        {
            **BASE,
            "eps": "36/255",
            "milestones": [10, 20],
            "max_train": 50,
            "delta": 0.1,
            "optimizer": "sgd",
            "certify_eps": ["36/255", 0.2],
        }
    )
    assert set(cfg.to_dict()) == set(KEYS)
    assert build_config(cfg.to_dict()) == cfg


def test_input_mapping_is_not_modified():
    values = {**BASE, "eps": "36/255"}
    build_config(values)
    assert values == {**BASE, "eps": "36/255"}


# ----------------------------------------------------------------------------- fractions
def test_eps_fraction():
    cfg = build_config({**BASE, "eps": "36/255"})
    assert cfg.eps == pytest.approx(36 / 255)
    assert isinstance(cfg.eps, float)


def test_certify_eps_fractions_and_numbers():
    cfg = build_config({**BASE, "certify_eps": ["36/255", 0.2]})
    assert cfg.certify_eps == pytest.approx([36 / 255, 0.2])
    assert all(isinstance(e, float) for e in cfg.certify_eps)


def test_integers_are_converted():
    cfg = build_config({**BASE, "epochs": 10.0, "lr": 1, "p": "1/100"})
    assert cfg.epochs == 10 and isinstance(cfg.epochs, int)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.p == pytest.approx(0.01)


@pytest.mark.parametrize("text, value", [("36/255", 36 / 255), ("0.5", 0.5), (2, 2.0), (" 1 / 4 ", 0.25)])
def test_parse_number(text, value):
    assert parse_number("eps", text) == pytest.approx(value)


# ------------------------------------------------------------------- malformed configs
# (changes to BASE, keys removed from BASE, how the message starts, more text it must hold)
MALFORMED = [
    ({"lr_rate": 0.1}, (), "unknown key 'lr_rate'", ["did you mean 'lr'"]),
    ({"epoch": 3}, (), "unknown key 'epoch'", ["did you mean 'epochs'"]),
    ({"certify_epsilon": [0.1]}, (), "unknown key 'certify_epsilon'", ["did you mean 'certify_eps'"]),
    ({}, ("dataset",), "missing required key 'dataset'", []),
    ({}, ("arch",), "missing required key 'arch'", []),
    ({}, ("loss",), "missing required key 'loss'", []),
    ({"arch": "resnet50"}, (), "arch: 'resnet50'", ["2C2F", "4C3F", "6C2F", "8C2F", "moons-mlp"]),
    ({"loss": "hinge"}, (), "loss: 'hinge'", ["cll", "gloro", "ce"]),
    ({"dataset": "imagenet"}, (), "dataset: 'imagenet'", ["moons", "mnist", "cifar10", "tinyimagenet"]),
    ({"dataset": 5}, (), "dataset: 5", []),
    ({"p": 0}, (), "p: 0", ["(0, 1)"]),
    ({"p": 1}, (), "p: 1", ["(0, 1)"]),
    ({"p": -0.1}, (), "p: -0.1", ["(0, 1)"]),
    ({"p": "abc"}, (), "p: 'abc'", ["not a number"]),
    ({"eps": 0}, (), "eps: 0", ["> 0"]),
    ({"eps": -1}, (), "eps: -1", ["> 0"]),
    ({"eps": "1/0"}, (), "eps: '1/0'", ["fraction"]),
    ({"eps": float("nan")}, (), "eps: nan", ["finite"]),
    ({"eps": float("inf")}, (), "eps: inf", ["finite"]),
    ({"eps": "inf/1"}, (), "eps: 'inf/1'", ["finite"]),
    ({"eps": 10**400}, (), "eps: ", ["not a number"]),
    ({"eps": True}, (), "eps: True", ["not a number"]),
    ({"lr": 0}, (), "lr: 0", ["> 0"]),
    ({"lr": "fast"}, (), "lr: 'fast'", []),
    ({"epochs": 0}, (), "epochs: 0", [">= 1"]),
    ({"epochs": 2.5}, (), "epochs: 2.5", ["integer"]),
    ({"epochs": float("inf")}, (), "epochs: inf", ["integer"]),
    ({"epochs": float("nan")}, (), "epochs: nan", ["integer"]),
    ({"epochs": "10"}, (), "epochs: '10'", ["integer"]),
    ({"batch_size": True}, (), "batch_size: True", ["integer"]),
    ({"optimizer": "rmsprop"}, (), "optimizer: 'rmsprop'", ["adamw", "adam", "sgd"]),
    ({"schedule": "linear"}, (), "schedule: 'linear'", ["multistep", "cosine"]),
    ({"cll_form": "pair"}, (), "cll_form: 'pair'", ["pairwise", "per_logit"]),
    ({"cll_offset": "both"}, (), "cll_offset: 'both'", ["two-sided", "one-sided"]),
    ({"betas": [0.9]}, (), "betas: [0.9]", ["two numbers"]),
    ({"betas": [0.9, 1.0]}, (), "betas: [0.9, 1.0]", ["[0, 1)"]),
    ({"certify_eps": []}, (), "certify_eps: []", ["non-empty"]),
    ({"certify_eps": [0, 0.1]}, (), "certify_eps: [0, 0.1]", ["> 0"]),
    ({"certify_eps": 0.15}, (), "certify_eps: 0.15", ["list"]),
    ({"certify_eps": ["1/0"]}, (), "certify_eps: '1/0'", []),
    ({"milestones": [30, 10]}, (), "milestones: [30, 10]", ["increasing"]),
    ({"milestones": "30"}, (), "milestones: '30'", ["list"]),
    ({"augment": "yes"}, (), "augment: 'yes'", ["true or false"]),
    ({"deterministic": 1}, (), "deterministic: 1", ["true or false"]),
    ({"amp": "bf16"}, (), "amp: 'bf16'", ["true or false"]),
    ({"compile": 1}, (), "compile: 1", ["true or false"]),
    ({"max_train": 0}, (), "max_train: 0", [">= 1"]),
    ({"pi_iters": -1}, (), "pi_iters: -1", [">= 0"]),
    ({"lip_penalty": -1e-4}, (), "lip_penalty: -0.0001", [">= 0"]),
    ({"device": "tpu"}, (), "device: 'tpu'", ["auto", "cpu", "cuda"]),
    ({"data_root": 3}, (), "data_root: 3", []),
    ({"delta": "x"}, (), "delta: 'x'", []),
    ({"k_scale_start": -1}, (), "k_scale_start: -1", [">= 0"]),
    ({"k_scale_power": "high"}, (), "k_scale_power: 'high'", ["not a number"]),
    ({"trades": -0.5}, (), "trades: -0.5", [">= 0"]),
    ({"eps_warmup": -1}, (), "eps_warmup: -1", [">= 0"]),
    ({"sparsity": "x"}, (), "sparsity: 'x'", ["not a number"]),
    ({"cr_gamma": -1}, (), "cr_gamma: -1", [">= 0"]),
    ({"hinge_margin": None}, (), "hinge_margin: None", ["not a number"]),
    ({"offset": -2}, (), "offset: -2", [">= 0"]),
    ({"temperature": 0}, (), "temperature: 0", ["> 0"]),
    ({"la_gamma": -1}, (), "la_gamma: -1", [">= 0"]),
    ({"head": "softmax"}, (), "head: 'softmax'", ["auto", "linear", "lln"]),
    ({"width": 0}, (), "width: 0", ["> 0"]),
    ({"activation": 3}, (), "activation: 3", ["a name"]),
    ({"activation": "sigmoid"}, (), "activation: 'sigmoid'", ["maxmin", "clipped_maxmin", "clipped_relu"]),
    ({"clip_init": -1.0}, (), "clip_init: -1.0", [">= 0"]),
    ({"clip_init": [1.0, -1.0]}, (), "clip_init: [1.0, -1.0]", ["non-empty list of numbers >= 0"]),
    ({"clip_init": []}, (), "clip_init: []", ["non-empty list"]),
    ({"lip_pow": 0}, (), "lip_pow: 0", ["> 0"]),
    ({"lip_penalty_form": "local"}, (), "lip_penalty_form: 'local'", ["global", "batch"]),
    ({"pi_tol": 0}, (), "pi_tol: 0", ["> 0"]),
    ({"seed": -1}, (), "seed: -1", [">= 0"]),
    ({"seed": 0.5}, (), "seed: 0.5", ["integer"]),
    ({"weight_decay": -0.1}, (), "weight_decay: -0.1", [">= 0"]),
    ({"momentum": -0.9}, (), "momentum: -0.9", [">= 0"]),
    ({"gamma": -0.1}, (), "gamma: -0.1", [">= 0"]),
    ({"max_test": 0}, (), "max_test: 0", [">= 1"]),
    ({"num_workers": 1.5}, (), "num_workers: 1.5", ["integer"]),
    ({"eval_batch_size": 0}, (), "eval_batch_size: 0", [">= 1"]),
    ({"local_estimate_iters": 0}, (), "local_estimate_iters: 0", [">= 1"]),
    ({"cll_head_gradient": "yes"}, (), "cll_head_gradient: 'yes'", ["true or false"]),
    ({"gloro_head_gradient": 0}, (), "gloro_head_gradient: 0", ["true or false"]),
    ({"checkpoint_every": 0}, (), "checkpoint_every: 0", [">= 1"]),
    ({"emma_eps_start": -0.1}, (), "emma_eps_start: -0.1", [">= 0"]),
    ({"emma_eps_end": "x"}, (), "emma_eps_end: 'x'", ["not a number"]),
    ({"lookahead": "yes"}, (), "lookahead: 'yes'", ["true or false"]),
    ({"warmup_epochs": -1}, (), "warmup_epochs: -1", [">= 0"]),
    ({"grad_clip": 0}, (), "grad_clip: 0", ["> 0"]),
    ({"optimizer": "nadamw"}, (), "optimizer: 'nadamw'", ["nadam"]),
]


@pytest.mark.parametrize(
    "changes, removed, start, extras",
    MALFORMED,
    ids=[f"{next(iter(c), None) or 'no-' + r[0]}={next(iter(c.values()), '')!r}"[:40] for c, r, _, _ in MALFORMED],
)
def test_malformed_config_is_one_line_naming_the_key(changes, removed, start, extras):
    values = {k: v for k, v in {**BASE, **changes}.items() if k not in removed}
    msg = config_error(values)
    assert msg.startswith(start), msg
    for text in extras:
        assert text in msg, msg


def test_every_key_has_a_malformed_case():
    """MALFORMED holds, for every key, a value its rule refuses (or, for a required key, the key
    left out): a new key comes with a case, which the schema test below checks too."""
    covered = {key for changes, removed, _, _ in MALFORMED for key in (*changes, *removed)}
    assert [key for key in KEYS if key not in covered] == []


# The grid schema (JSON schema, from the same declarations) rejects each of these too, except what
# JSON schema cannot say: a fraction's value, an order, non-finite or out-of-float-range numbers
# (cll.grid then builds each cell's run config, which catches them). Registered names (dataset, arch,
# loss, activation) are the registries' enums there, not the key's rule: an unknown one passes here.
SCHEMA_CANNOT = {
    "eps='1/0'", "eps=nan", "eps=inf", f"eps={10**400!r}", "certify_eps=['1/0']", "milestones=[30, 10]",
    "activation='sigmoid'",
}  # fmt: skip


@pytest.mark.parametrize(
    "changes", [c for c, _, _, _ in MALFORMED if len(c) == 1 and next(iter(c)) in set(KEYS) - set(REQUIRED)]
)
def test_the_schema_of_a_key_is_no_weaker_than_its_rule(changes):
    import jsonschema

    ((key, value),) = changes.items()
    schema = {**rule(key).schema(), "$defs": {"number_text": NUMBER_TEXT}}
    valid = jsonschema.Draft202012Validator(schema).is_valid(value)
    assert valid == (f"{key}={value!r}" in SCHEMA_CANNOT), (key, value)


def test_the_schema_of_every_key_accepts_its_default():
    import jsonschema

    for key in set(KEYS) - set(REQUIRED):
        schema = {**rule(key).schema(), "$defs": {"number_text": NUMBER_TEXT}}
        jsonschema.validate(default(key), schema)
        assert rule(key).check(key, default(key)) == default(key), key


def test_every_key_is_documented_in_the_table():
    rows = describe()
    assert [r[0] for r in rows] == KEYS
    assert all(all(cell for cell in r) for r in rows)
    table = markdown_table().splitlines()
    assert len(table) == 2 + len(KEYS) and all(line.count(" | ") == 3 for line in table[2:])
    assert "| `p` | 0.3 | a number in (0, 1) |" in markdown_table()
    assert "`lip_penalty_form` | global | one of global, batch | K of the penalty: global = K_F max_ij \\|\\|" in (
        markdown_table()
    )


@pytest.mark.parametrize("values", [["dataset", "moons"], "dataset: moons", None, 3])
def test_top_level_must_be_a_mapping(values):
    msg = config_error(values)
    assert "mapping" in msg


# ------------------------------------------------------------------------- YAML files
def test_load_example_file():
    cfg = load_config(EXAMPLE)
    assert (cfg.dataset, cfg.arch, cfg.loss) == ("moons", "moons-mlp", "cll")
    assert cfg.p == 0.01 and cfg.cll_form == "per_logit" and cfg.cll_offset == "one-sided"
    assert cfg.certify_eps == [0.15]


def test_overrides_win_over_the_file():
    cfg = load_config(EXAMPLE, ["p=0.2", "eps=36/255", "max_train=null"])
    assert cfg.p == 0.2
    assert cfg.eps == pytest.approx(36 / 255)
    assert cfg.max_train is None
    assert cfg.cll_form == "per_logit"  # the rest of the file is kept


def test_no_file_only_overrides():
    cfg = load_config(None, ["dataset=moons", "arch=moons-mlp", "loss=gloro"])
    assert cfg.loss == "gloro"
    with pytest.raises(ConfigError, match="missing required key 'dataset'"):
        load_config(None, [])


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "run.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in one_line(err)


def test_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert str(tmp_path) in one_line(err)


def test_invalid_yaml_gives_a_line_number(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("arch: moons-mlp\ndataset: [moons\nloss: cll\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = one_line(err)
    assert str(path) in msg and "YAML" in msg
    assert re.search(r"line \d+", msg), msg


def test_binary_file_is_one_line(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x81\xff\xfe\x00garbage")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in one_line(err)


@pytest.mark.parametrize("text", ["- dataset: moons\n- arch: moons-mlp\n", "just a string\n", "42\n"])
def test_yaml_top_level_not_a_mapping(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = one_line(err)
    assert str(path) in msg and "mapping" in msg


def test_empty_file_needs_the_required_keys(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="missing required key"):
        load_config(path)
    assert load_config(path, ["dataset=moons", "arch=moons-mlp", "loss=ce"]).loss == "ce"


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(EXAMPLE.read_text() + "lr_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "did you mean 'lr'" in one_line(err)


# ----------------------------------------------------------------------------- --set
def test_parse_overrides():
    out = parse_overrides(
        [
            "eps=0.5",
            "certify_eps=[0.1, 0.2]",
            "max_train=null",
            "eps_frac=36/255",
            "augment=false",
            "data_root=/tmp/x=y",
            " lr = 0.01",
        ]
    )
    assert out["eps"] == 0.5
    assert out["certify_eps"] == [0.1, 0.2]
    assert out["max_train"] is None
    assert out["eps_frac"] == "36/255"  # fractions stay text until build_config
    assert out["augment"] is False
    assert out["data_root"] == "/tmp/x=y"  # only the first '=' splits
    assert out["lr"] == 0.01  # key and value are stripped


def test_override_exponent_without_dot():
    # YAML 1.1 reads 1e-3 as a string; build_config still takes it as a number
    assert load_config(EXAMPLE, ["lr=1e-3", "lip_penalty=1e-5"]).lr == pytest.approx(1e-3)


def test_override_with_empty_value_is_null():
    assert parse_overrides(["max_test="]) == {"max_test": None}


@pytest.mark.parametrize("pair", ["novalue", "=0.5", "certify_eps=[0.1", "p={a: "])
def test_bad_override_is_one_line(pair):
    with pytest.raises(ConfigError) as err:
        parse_overrides([pair])
    msg = one_line(err)
    assert "--set" in msg and repr(pair) in msg


def test_bad_override_value_names_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(EXAMPLE, ["p=2"])
    assert one_line(err).startswith("p: 2")


def test_speed_options_default_off_and_accept_booleans():
    # amp and compile are opt-in (every reference recipe trains eager fp32)
    cfg = build_config(BASE)
    assert cfg.amp is False and cfg.compile is False
    cfg = build_config({**BASE, "amp": True, "compile": True})
    assert cfg.amp is True and cfg.compile is True
