"""The run config: every key of one training run, its default, and one-line validation errors.

A run config is a flat YAML mapping. Only ``dataset``, ``arch`` and ``loss`` are required; every
other key has the default below (the CIFAR-10 4C3F recipe of the CLL reference, shared/spec/cll.md
section 6). ``cll train --set key=value`` overrides a key; values are parsed as YAML, and an eps may
be written as a fraction such as ``36/255``.

A misspelt key, a value of the wrong type or out of range fails with one line naming the key and
what is allowed, before anything is written.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

CHOICES = {
    "cll_form": ("pairwise", "per_logit"),
    "cll_offset": ("two-sided", "one-sided"),
    "optimizer": ("adamw", "adam", "sgd"),
    "schedule": ("multistep", "constant", "cosine", "triangular", "exp"),
    "device": ("auto", "cpu", "cuda"),
    "head": ("auto", "linear", "lln"),
    "lip_penalty_form": ("global", "batch"),
}


@dataclass
class RunConfig:
    # ---- what to train (required) ----
    dataset: str  # moons | digits | mnist | cifar10 | cifar100 | tinyimagenet
    arch: str  # a registered architecture (cll list): 4C3F, 8C2F, LipConv-20, SLL-XL, ...
    loss: str  # cll | gloro | ce | soc_cr | cpl_hinge | sll_offset_ce | local_lip_b
    # ---- the certificate and the loss ----
    eps: float = 0.15  # training eps (l2, [0,1] pixels); CLL's sigma and GloRo's margin
    p: float = 0.3  # CLL slack in (0,1): K^(h o f) = log((2-p)/p)/eps
    delta: float | None = None  # CLL offset; null = eps (every reference recipe)
    cll_form: str = "pairwise"  # pairwise (CLL class) | per_logit (V2: 6C2F/8C2F/moons recipes)
    cll_offset: str = "two-sided"  # two-sided (target -delta, others +delta) | one-sided (moons)
    k_scale_start: float = 1.0  # CLL K_scale schedule poly start -> 1 (8C2F recipe: 0.01)
    k_scale_power: float = 10.0  # power of that schedule
    trades: float = 0.0  # GloRo: 0 = bottom-class CE, > 0 = TRADES weight
    eps_warmup: float = 1.0  # gloro, local_lip_b: fraction of training over which eps ramps 0 -> eps
    # (gloro: power 5; local_lip_b: linear, and its CE weight kappa 1 -> 0 alongside)
    sparsity: float = 0.01  # local_lip_b: weight of the sparsity term on the activations' bounds
    cr_gamma: float = 0.0  # soc_cr: weight of SOC's certificate regulariser
    hinge_margin: float = 0.7  # cpl_hinge: margin of CPL's multi-class hinge
    offset: float = 2.1213203435596424  # sll_offset_ce: logit offset u (3 sqrt2 / 2)
    temperature: float = 0.25  # sll_offset_ce: temperature tau
    head: str = "auto"  # auto (lln for the peers' losses, else linear) | linear | lln
    width: float = 1.0  # scales every layer width of the architecture (1 = the paper's)
    activation: str = "maxmin"  # GloRo-family nets: maxmin | clipped_maxmin | clipped_relu (cll list)
    clip_init: float | list = 1.0  # initial threshold of clipped activations: one, or one per layer
    # ---- Lipschitz control ----
    lip_penalty: float = 1e-4  # lambda of the penalty lambda * K^lip_pow (0 = off)
    lip_pow: float = 2.0  # power of that penalty
    lip_penalty_form: str = "global"  # global: K = K_F max_ij||W_i-W_j|| | batch: max over the batch's K_tj (peers)
    pi_iters: int = 5  # power iterations per training step (with gradient)
    pi_tol: float = 1e-7  # relative tolerance of the converged estimate (epoch end, certify)
    # ---- optimisation ----
    seed: int = 0
    epochs: int = 801
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw
    momentum: float = 0.9  # sgd
    schedule: str = "multistep"  # LR schedule, stepped per iteration
    milestones: list | None = None  # multistep epochs; null = 50%, 75%, 97.5% of epochs
    # exp: [the epoch the decay starts]; null = 60% of epochs
    gamma: float = 0.1  # multistep factor; exp: the LR factor reached at the end
    # ---- data ----
    data_root: str | None = None  # null = $CLL_DATA or ./data
    augment: bool = True  # the spec's train augmentation (CIFAR, Tiny-ImageNet)
    max_train: int | None = None  # first N training samples only (quick runs)
    max_test: int | None = None  # first N test samples only
    num_workers: int = 0  # DataLoader workers
    eval_batch_size: int = 1000
    # ---- evaluation ----
    certify_eps: list = field(default_factory=lambda: [36 / 255, 72 / 255, 108 / 255])
    # ---- runtime ----
    device: str = "auto"  # auto = cuda when visible, else cpu
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always saves)
    deterministic: bool = False  # torch.use_deterministic_algorithms
    amp: bool = False  # GPU only: bf16 autocast of the network's forward; head, loss and K stay
    # fp32 (every reference recipe trains in fp32: spec cll.md pitfall 5)
    compile: bool = False  # torch.compile the network's forward (the power iterations stay eager)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REQUIRED = ("dataset", "arch", "loss")
NAMES = REQUIRED + ("activation",)  # registered names (cll list)
KEYS = [f.name for f in fields(RunConfig)]


def parse_number(key: str, value: Any) -> float:
    """A float, also from a fraction string such as '36/255'."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not a number")
    if isinstance(value, str) and "/" in value:
        num, _, den = value.partition("/")
        try:
            result = float(num) / float(den)
        except (ValueError, ZeroDivisionError, OverflowError):
            raise ConfigError(f"{key}: {value!r} is not a number or fraction like 36/255") from None
    else:
        try:
            result = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: {value!r} is not a number") from None
    if not math.isfinite(result):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    return result


def _integer(key: str, value: Any) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not math.isfinite(value))
        or int(value) != value
    ):
        raise ConfigError(f"{key}: {value!r} is not an integer")
    return int(value)


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {value!r} is not allowed; expected {allowed}")


def _normalise(key: str, value: Any) -> Any:
    """Type-convert one value and check its range."""
    if key in NAMES:
        _check(isinstance(value, str), key, value, "a name (cll list shows them)")
        return value
    if key in CHOICES:
        _check(value in CHOICES[key], key, value, "one of " + ", ".join(CHOICES[key]))
        return value
    if key in ("eps", "lr", "pi_tol", "lip_pow", "temperature", "width"):
        v = parse_number(key, value)
        _check(v > 0, key, value, "a number > 0")
        return v
    if key == "p":
        v = parse_number(key, value)
        _check(0 < v < 1, key, value, "a number in (0, 1)")
        return v
    if key == "delta":
        if value is None:
            return None
        v = parse_number(key, value)
        _check(v >= 0, key, value, "a number >= 0 or null (= eps)")
        return v
    if key in (
        "lip_penalty",
        "weight_decay",
        "trades",
        "momentum",
        "eps_warmup",
        "k_scale_start",
        "k_scale_power",
        "gamma",
        "cr_gamma",
        "hinge_margin",
        "offset",
        "sparsity",
    ):
        v = parse_number(key, value)
        _check(v >= 0, key, value, "a number >= 0")
        return v
    if key in ("pi_iters", "num_workers", "seed"):
        v = _integer(key, value)
        _check(v >= 0, key, value, "an integer >= 0")
        return v
    if key in ("epochs", "batch_size", "eval_batch_size", "checkpoint_every"):
        v = _integer(key, value)
        _check(v >= 1, key, value, "an integer >= 1")
        return v
    if key in ("max_train", "max_test"):
        if value is None:
            return None
        v = _integer(key, value)
        _check(v >= 1, key, value, "an integer >= 1 or null")
        return v
    if key in ("augment", "deterministic", "amp", "compile"):
        _check(isinstance(value, bool), key, value, "true or false")
        return value
    if key == "data_root":
        _check(value is None or isinstance(value, str), key, value, "a directory path or null")
        return value
    if key == "betas":
        _check(isinstance(value, list) and len(value) == 2, key, value, "a list of two numbers in [0, 1)")
        v = [parse_number(key, b) for b in value]
        _check(all(0 <= b < 1 for b in v), key, value, "a list of two numbers in [0, 1)")
        return v
    if key == "milestones":
        if value is None:
            return None
        _check(isinstance(value, list), key, value, "a list of epochs or null")
        v = [_integer(key, m) for m in value]
        _check(all(m >= 1 for m in v) and v == sorted(v), key, value, "increasing epochs >= 1")
        return v
    if key == "clip_init":
        allowed = "a number >= 0 or a non-empty list of them (one per activation layer)"
        _check(isinstance(value, (list, int, float, str)) and value != [], key, value, allowed)
        v = [parse_number(key, t) for t in value] if isinstance(value, list) else parse_number(key, value)
        _check(all(t >= 0 for t in (v if isinstance(v, list) else [v])), key, value, allowed)
        return v
    if key == "certify_eps":
        _check(isinstance(value, list) and len(value) > 0, key, value, "a non-empty list of numbers > 0")
        v = [parse_number(key, e) for e in value]
        _check(all(e > 0 for e in v), key, value, "a non-empty list of numbers > 0")
        return v
    raise AssertionError(f"no validation rule for {key}")  # every RunConfig field has one


def build_config(values: dict[str, Any], check_names: bool = True) -> RunConfig:
    """Validate a mapping of keys to values and fill in the defaults. ``check_names=False`` skips
    the registry look-up of dataset/arch/loss (it imports torch), for callers that checked the
    names already: the workflow's grid schema lists them, and a test keeps it equal to the
    registries."""
    if not isinstance(values, dict):
        raise ConfigError(f"a run config must be a mapping of keys to values, got {type(values).__name__}")
    for key in values:
        if key not in KEYS:
            close = (
                difflib.get_close_matches(str(key), KEYS, n=1) or [k for k in KEYS if k in str(key).split("_")][:1]
            )  # lr_rate -> lr
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {key!r}{hint}; allowed keys: {', '.join(KEYS)}")
    missing = [k for k in REQUIRED if k not in values]
    if missing:
        raise ConfigError(f"missing required key {missing[0]!r} (a run config needs {', '.join(REQUIRED)})")
    cfg = RunConfig(**{k: _normalise(k, v) for k, v in values.items()})
    if check_names:
        _check_names(cfg)
    return cfg


def _check_names(cfg: RunConfig) -> None:
    """dataset, arch, loss and activation must be registered names."""
    from . import data, layers, losses, models  # late: the registries import torch-heavy modules

    for key, allowed in (
        ("dataset", data.dataset_names()),
        ("arch", models.names()),
        ("loss", losses.names()),
        ("activation", layers.ACTIVATIONS.names()),
    ):
        value = getattr(cfg, key)
        _check(value in allowed, key, value, "one of " + ", ".join(allowed))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["eps=0.5", "certify_eps=[0.1, 0.2]"]`` -> a dict, values parsed as YAML."""
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML") from None
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or none: then overrides must name dataset, arch and loss)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {str(path)!r} cannot be read ({type(err).__name__})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    values.update(parse_overrides(overrides or []))
    return build_config(values)
