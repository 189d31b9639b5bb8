"""The run config: every key of one training run, declared once, with its default, its allowed
values and what it means.

A run config is a flat YAML mapping. Only ``dataset``, ``arch`` and ``loss`` are required; every
other key has the default declared in ``RunConfig`` below (the CIFAR-10 4C3F recipe of the CLL
reference, docs/recipes.md). ``cll train --set key=value`` overrides a key; values are parsed as
YAML, and a number may be written as a fraction such as ``36/255``.

Each field of ``RunConfig`` is the one declaration of its key: ``setting(default, rule, doc)``.
Everything else is derived from it: validation here (a misspelt key, a value of the wrong type or
out of range fails with one line naming the key and what is allowed, before anything is written),
the grid schema's ``run_config`` section (``run_config_schema``, written into
workflow/schemas/config.schema.yaml by ``make schema``), ``cll list`` and the README's table
(``markdown_table``). Adding a key is adding one field.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .values import LOCAL_ESTIMATE_ITERS, PAPER_EPS, Choice, Flag, Number, Numbers, OneOrMore, Rule, Text
from .values import parse_number as parse_number  # re-exported: cll.config.parse_number is public

REQUIRED_VALUE = object()  # setting() default of a key every run config must give


def setting(default: Any, rule: Rule, doc: str) -> Any:
    """The declaration of one run-config key: its default, the rule its values follow and what it
    means (the README table and the grid schema print ``doc``)."""
    meta = {"rule": rule, "doc": doc}
    if default is REQUIRED_VALUE:
        return dataclasses.field(metadata=meta)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


POSITIVE = Number(low=0, open_low=True)
NON_NEGATIVE = Number(low=0)
COUNT = Number(low=0, integer=True)
AT_LEAST_ONE = Number(low=1, integer=True)
NAME = Text("a name (cll list shows them)")


# ------------------------------------------------------------------------------ the keys
@dataclass
class RunConfig:
    # ---- what to train (required) ----
    dataset: str = setting(REQUIRED_VALUE, NAME, "data set: an embedded one (no download) or one read from data_root")
    arch: str = setting(REQUIRED_VALUE, NAME, "architecture: the GloRo family's or a peer's (docs/recipes.md)")
    loss: str = setting(REQUIRED_VALUE, NAME, "loss: CLL, GloRo's, cross-entropy, each peer's own, Local-Lip-B's")
    # ---- the certificate and the loss ----
    eps: float = setting(0.15, POSITIVE, "training eps (L2 radius, [0,1] pixels): CLL's sigma and GloRo's margin")
    p: float = setting(0.3, Number(0, 1, open_low=True, open_high=True), "CLL slack: K^(h o f) = log((2-p)/p)/eps")
    delta: float | None = setting(None, Number(low=0, null="eps"), "CLL offset (every reference recipe: eps)")
    cll_form: str = setting(
        "pairwise", Choice(("pairwise", "per_logit")), "CLL normalisation: pairwise, or per_logit (6C2F/8C2F/moons)"
    )
    cll_offset: str = setting(
        "two-sided",
        Choice(("two-sided", "one-sided")),
        "CLL offset: two-sided (target -delta, others +delta) or one-sided (moons)",
    )
    k_scale_start: float = setting(1.0, NON_NEGATIVE, "CLL K_scale schedule, polynomial from this to 1 (8C2F: 0.01)")
    k_scale_power: float = setting(10.0, NON_NEGATIVE, "power of that schedule")
    cll_head_gradient: bool = setting(
        False,
        Flag(),
        "CLL: the head's row distances in the calibration keep their gradient (false: detached, as every CLL "
        "recipe asks; true: as SOC's train_robust.py runs, its --detach_K never reaching the loss)",
    )
    trades: float = setting(0.0, NON_NEGATIVE, "GloRo: 0 = bottom-class cross-entropy, > 0 = TRADES weight")
    gloro_head_gradient: bool = setting(
        True,
        Flag(),
        "GloRo: K_F's gradient also pushes the head's largest row distance down, as the CLL reference's "
        "GloroLoss does (K_F = whole-model estimate / that distance detached); false: K_F of the body alone",
    )
    eps_warmup: float = setting(
        1.0,
        NON_NEGATIVE,
        "gloro, local_lip_b, emma, logit_annealing: fraction of training over which eps ramps 0 -> eps (gloro: "
        "power 5; local_lip_b: linear, and its CE weight kappa 1 -> 0 alongside; emma, logit_annealing: "
        "emma_eps_start eps -> emma_eps_end eps, linear in whole epochs; LiResNet, BRONet: 0.5)",
    )
    emma_eps_start: float = setting(
        0.1, NON_NEGATIVE, "emma, logit_annealing: training eps at the start, as a factor on eps"
    )
    emma_eps_end: float = setting(
        3.0, NON_NEGATIVE, "emma, logit_annealing: training eps after its ramp, as a factor on eps"
    )
    sparsity: float = setting(
        0.01, NON_NEGATIVE, "local_lip_b: weight of the sparsity term on the clipped activations' bounds"
    )
    cr_gamma: float = setting(0.0, NON_NEGATIVE, "soc_cr: weight of SOC's certificate regulariser")
    hinge_margin: float = setting(0.7, NON_NEGATIVE, "cpl_hinge: margin of CPL's multi-class hinge")
    offset: float = setting(
        2.1213203435596424,
        NON_NEGATIVE,
        "sll_offset_ce, logit_annealing: offset u taken off the label's logit (SLL: 3 sqrt2 / 2; BRONet: 2)",
    )
    temperature: float = setting(
        0.25, POSITIVE, "sll_offset_ce, logit_annealing: temperature tau dividing the logits (SLL: 0.25; BRONet: 0.75)"
    )
    la_gamma: float = setting(5.0, NON_NEGATIVE, "logit_annealing: power of its annealing factor (1 - p_t)^la_gamma")
    head: str = setting(
        "auto",
        Choice(("auto", "linear", "lln", "trunc")),
        "classifier head: linear, lln (unit rows), trunc (the first C features, fixed); auto = the loss's own "
        "(CPL's and SLL's losses trunc, SOC's lln, as their code bases train them; the others linear)",
    )
    width: float = setting(1.0, POSITIVE, "factor on every layer width of the architecture (1 = the paper's)")
    activation: str = setting(
        "maxmin",
        NAME,
        "activation of the GloRo-family nets: MaxMin, or Local-Lip-B's clipped ones (learnable thresholds)",
    )
    clip_init: float | list = setting(
        1.0, OneOrMore(NON_NEGATIVE), "initial threshold of the clipped activations: one, or one per activation layer"
    )
    # ---- Lipschitz control ----
    lip_penalty: float = setting(1e-4, NON_NEGATIVE, "lambda of the penalty lambda * K^lip_pow (0 = off)")
    lip_pow: float = setting(2.0, POSITIVE, "power of that penalty")
    lip_penalty_form: str = setting(
        "global",
        Choice(("global", "batch")),
        "K of the penalty: global = K_F max_ij ||W_i - W_j||; batch = max over the batch's labels t of "
        "K_F ||W_t - W_j|| (CLL inside SOC, CPL, SLL)",
    )
    pi_iters: int = setting(5, COUNT, "power iterations per training step (with gradient)")
    pi_tol: float = setting(1e-7, POSITIVE, "relative tolerance of the converged estimate (epoch end, certify)")
    # ---- optimisation ----
    seed: int = setting(0, COUNT, "random seed")
    epochs: int = setting(801, AT_LEAST_ONE, "training epochs")
    batch_size: int = setting(128, AT_LEAST_ONE, "training batch size")
    optimizer: str = setting("adamw", Choice(("adamw", "adam", "sgd", "nadam")), "optimizer")
    lookahead: bool = setting(
        False, Flag(), "Lookahead around the optimizer (k 6, alpha 0.5, synced at every epoch end: LiResNet's)"
    )
    lr: float = setting(1e-3, POSITIVE, "learning rate")
    weight_decay: float = setting(0.0, NON_NEGATIVE, "weight decay")
    betas: list = setting([0.9, 0.999], Numbers(Number(0, 1, open_high=True), size=2), "adam/adamw/nadam betas")
    momentum: float = setting(0.9, NON_NEGATIVE, "sgd momentum")
    schedule: str = setting(
        "multistep",
        Choice(("multistep", "constant", "cosine", "triangular", "exp")),
        "learning-rate schedule, stepped per iteration",
    )
    milestones: list | None = setting(
        None,
        Numbers(AT_LEAST_ONE, increasing=True, null="multistep 50%, 75%, 97.5% of epochs; exp 60%"),
        "multistep: epochs at which the learning rate drops; exp: [the epoch the decay starts]",
    )
    gamma: float = setting(0.1, NON_NEGATIVE, "multistep: factor of each drop; exp: the factor reached at the end")
    warmup_epochs: float = setting(
        0.0,
        NON_NEGATIVE,
        "linear learning-rate warm-up over this many epochs (lr/n .. lr per iteration); the schedule then runs "
        "on the iterations after it (LiResNet: 20)",
    )
    grad_clip: float | None = setting(
        None, Number(low=0, open_low=True, null="off"), "clip the gradient's global l2 norm to this (LiResNet: 3)"
    )
    # ---- data ----
    data_root: str | None = setting(
        None, Text("a directory path", null="$CLL_DATA, else ./data"), "folder holding the data sets"
    )
    augment: bool = setting(True, Flag(), "the recipe's training augmentation (CIFAR, Tiny-ImageNet)")
    max_train: int | None = setting(None, Number(low=1, integer=True, null="all"), "first N training samples only")
    max_test: int | None = setting(None, Number(low=1, integer=True, null="all"), "first N test samples only")
    num_workers: int = setting(0, COUNT, "DataLoader worker processes")
    eval_batch_size: int = setting(1000, AT_LEAST_ONE, "batch size of evaluation and certification")
    # ---- evaluation ----
    certify_eps: list = setting(
        list(PAPER_EPS),
        Numbers(POSITIVE, least=1),
        "radii at which cll certify reports CRA (default 36/255, 72/255, 108/255)",
    )
    local_estimate_iters: int = setting(
        LOCAL_ESTIMATE_ITERS,
        AT_LEAST_ONE,
        "local_lip_b: power iterations per masked norm of the paper's estimate-based certificate, reported "
        "beside the sound one (cll certify; the paper: 2000)",
    )
    # ---- runtime ----
    device: str = setting("auto", Choice(("auto", "cpu", "cuda")), "auto = CUDA when visible, else CPU")
    checkpoint_every: int = setting(1, AT_LEAST_ONE, "epochs between checkpoints (the last epoch always saves)")
    deterministic: bool = setting(False, Flag(), "torch.use_deterministic_algorithms")
    amp: bool = setting(
        False,
        Flag(),
        "GPU only: bf16 autocast of the network's forward; head, loss and K stay fp32 "
        "(every reference recipe trains in fp32)",
    )
    compile: bool = setting(False, Flag(), "torch.compile the network's forward (the power iterations stay eager)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SETTINGS = {f.name: f for f in fields(RunConfig)}
KEYS = list(SETTINGS)
REQUIRED = tuple(k for k, f in SETTINGS.items() if f.default is MISSING and f.default_factory is MISSING)
NAMES = ("dataset", "arch", "loss", "activation")  # keys whose values are registered names (cll list)


def registered_names() -> dict[str, list[str]]:
    """Each key of NAMES -> the names registered for it (imports torch: the registries live in
    torch-heavy modules)."""
    from . import data, layers, losses, models

    return {
        "dataset": data.dataset_names(),
        "arch": models.names(),
        "loss": losses.names(),
        "activation": layers.ACTIVATIONS.names(),
    }


def default(key: str) -> Any:
    f = SETTINGS[key]
    return f.default_factory() if f.default is MISSING else f.default


def rule(key: str) -> Rule:
    """What the values of ``key`` may be (its declaration's rule)."""
    return SETTINGS[key].metadata["rule"]


def build_config(values: dict[str, Any], check_names: bool = True) -> RunConfig:
    """Validate a mapping of keys to values and fill in the defaults. ``check_names=False`` skips
    the registry look-up of the NAMES keys (it imports torch), for callers that checked the names
    already: the workflow's grid schema lists them, and a test keeps it equal to the registries."""
    if not isinstance(values, dict):
        raise ConfigError(f"a run config must be a mapping of keys to values, got {type(values).__name__}")
    for key in values:
        if key not in SETTINGS:
            close = (
                difflib.get_close_matches(str(key), KEYS, n=1) or [k for k in KEYS if k in str(key).split("_")][:1]
            )  # lr_rate -> lr
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {key!r}{hint}; allowed keys: {', '.join(KEYS)}")
    missing = [k for k in REQUIRED if k not in values]
    if missing:
        raise ConfigError(f"missing required key {missing[0]!r} (a run config needs {', '.join(REQUIRED)})")
    cfg = RunConfig(**{k: rule(k).check(k, v) for k, v in values.items()})
    if check_names:
        _check_names(cfg)
    return cfg


def _check_names(cfg: RunConfig) -> None:
    """dataset, arch, loss and activation must be registered names."""
    for key, allowed in registered_names().items():
        Choice(tuple(allowed)).check(key, getattr(cfg, key))


# ------------------------------------------------------------------------------ --set
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


def format_override(key: str, value: Any) -> str:
    """``key=value`` as ``parse_overrides`` reads it back (the value in YAML flow style: 1.0e-06,
    [400, 600], per_logit), the inverse of ``parse_overrides``."""
    return f"{key}={_yaml_value(value)}"


def _yaml_value(value: Any) -> str:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return _yaml_scalar(value)  # a grid repeats few values over ~1000 cells: dump each once
    return _yaml_dump(value)


@functools.lru_cache(maxsize=None, typed=True)  # typed: 1, 1.0 and True are three values
def _yaml_scalar(value: Any) -> str:
    return _yaml_dump(value)


def _yaml_dump(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()
    return text[: -len("...")].strip() if text.endswith("\n...") else text


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


# ------------------------------------------------------------------------------ derived views
def _shown(value: Any) -> str:
    """A default as the README and ``cll list`` print it (4 significant digits)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return yaml.safe_dump(value).split("\n")[0]  # null, true, false
    return str(value)


def describe() -> list[tuple[str, str, str, str]]:
    """(key, default, allowed values, meaning) of every key, in declaration order."""
    return [
        (key, "required" if key in REQUIRED else _shown(default(key)), rule(key).allowed, f.metadata["doc"])
        for key, f in SETTINGS.items()
    ]


def markdown_table() -> str:
    """The README's table of run-config keys (``make schema`` writes it there; a test keeps it
    current), with the registered names a key of NAMES allows."""
    names = registered_names()
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for key, value, allowed, doc in describe():
        if key in names:
            allowed = ", ".join(names[key])
        key, *cells = (text.replace("|", "\\|") for text in (key, value, allowed, doc))  # a | would end a cell
        lines.append(f"| `{key}` | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def run_config_schema(exclude: set[str]) -> dict:
    """The JSON schema of a mapping of run-config keys, ``exclude`` left out (the grid schema's
    ``run_config``: keys a grid row sets itself are not allowed in its ``set``)."""
    properties = {}
    for key, f in SETTINGS.items():
        if key not in exclude:
            value = {} if key in REQUIRED else {"default": default(key)}
            properties[key] = {**rule(key).schema(), **value, "description": f.metadata["doc"]}
    return {"type": "object", "additionalProperties": False, "properties": properties}
