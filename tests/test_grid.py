"""Tests for cll.grid: a grid checked against one schema (one-line errors naming the field),
expanded into cells, each cell's `cll train --set` arguments (a round trip back to its run
config) and its job resources, and the grid keys that carry no run config: a row's `published`
block (what its paper reports) and its `audit` setting. No Snakemake here (tests/test_workflow.py
runs it)."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml
from helpers import moons_grid

from cll import results, workflow
from cll.config import build_config, parse_overrides
from cll.errors import ConfigError
from cll.grid import AUDIT_DEFAULTS, RESOURCES, grid_schema, load_grid, parse_grid

ROOT = Path(__file__).resolve().parents[1]
GRIDS = [*sorted((ROOT / ".test").glob("*.yaml")), *sorted((ROOT / "config").glob("*.yaml"))]  # every grid
CI_GRID = yaml.safe_load((ROOT / ".test" / "config.yaml").read_text())


@pytest.fixture(scope="module")
def schema():
    return grid_schema()


def grid_error(schema, mutate) -> str:
    """The one-line message of the ConfigError that the CI grid, changed by ``mutate``, raises."""
    grid = copy.deepcopy(CI_GRID)
    mutate(grid)
    with pytest.raises(ConfigError) as info:
        parse_grid(grid, schema)
    msg = str(info.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def row(t, r, **changes):
    return lambda grid: grid["tables"][t]["rows"][r].update(changes)


def in_set(t, r, **changes):
    return lambda grid: grid["tables"][t]["rows"][r]["set"].update(changes)


# (how the CI grid is broken, how the message starts)
BAD = [
    (lambda g: g.pop("experiment"), "grid: 'experiment' is a required property"),
    (lambda g: g.update(tables=[]), "tables: [] should be non-empty"),
    (lambda g: g.update(typo=1), "grid: Additional properties are not allowed ('typo' was unexpected)"),
    (lambda g: g["tables"][0].update(name="a/b"), "tables[0].name: 'a/b' does not match"),
    (row(1, 0, arch="9C9F"), "tables[1].rows[0].arch: '9C9F' is not one of"),
    (row(1, 0, dataset="imagenet"), "tables[1].rows[0].dataset: 'imagenet' is not one of"),
    (row(1, 1, p=1.5), "tables[1].rows[1].p: 1.5 is greater than or equal to the maximum of 1"),
    (row(1, 1, p=[0.3, 0]), "tables[1].rows[1].p[1]: 0 is less than or equal to the minimum of 0"),
    (row(1, 0, eps=-0.1), "tables[1].rows[0].eps: -0.1 is less than or equal to the minimum of 0"),
    (row(1, 0, eps="3/0"), "tables[1].rows[0]: eps: '3/0' is not a number or fraction like 36/255"),
    (row(1, 0, seeds=[0, -1]), "tables[1].rows[0].seeds[1]: -1 is less than the minimum of 0"),
    (row(1, 0, resources={"gpus": -1}), "tables[1].rows[0].resources.gpus: -1 is less than the minimum of 0"),
    (row(1, 0, resources={"gpu": 1}), "tables[1].rows[0].resources: Additional properties are not allowed"),
    (row(1, 1, baseline="CE"), "tables[1].rows[1].baseline: 'CE' is not a method of table 'digits'"),
    # run-config keys in a row's set (or the grid's defaults): the rule of cll.config says what is allowed
    (in_set(1, 1, betas=[0.9, 1.0]), "tables[1].rows[1].set: betas: [0.9, 1.0] is not allowed; expected a list of two"),
    (in_set(1, 1, milestones="30"), "tables[1].rows[1].set: milestones: '30' is not allowed; expected a list of"),
    (in_set(1, 1, cll_form="pair"), "tables[1].rows[1].set: cll_form: 'pair' is not allowed; expected one of pairwise"),
    (in_set(1, 1, epochs=0), "tables[1].rows[1].set: epochs: 0 is not allowed; expected an integer >= 1"),
    (in_set(1, 1, seed=3), "tables[1].rows[1].set: Additional properties are not allowed ('seed' was unexpected)"),
    (in_set(1, 1, lr_rate=3), "tables[1].rows[1].set: Additional properties are not allowed ('lr_rate' was"),
    (lambda g: g.update(defaults={"p": 2}), "defaults: p: 2 is not allowed; expected a number in (0, 1)"),
    # what no schema says (an order, a fraction's range): the cell's run config, built by cll.config
    (in_set(1, 1, milestones=[3, 2]), "tables[1].rows[1]: milestones: [3, 2] is not allowed; expected"),
    (in_set(1, 1, lr="-1/2"), "tables[1].rows[1]: lr: '-1/2' is not allowed; expected a number > 0"),
]


@pytest.mark.parametrize("mutate, start", BAD, ids=[start.split(" is ")[0][:50] for _, start in BAD])
def test_bad_grid_is_one_line_naming_the_field(schema, mutate, start):
    msg = grid_error(schema, mutate)
    assert msg.startswith(start), msg


def test_a_cell_twice_with_different_settings_is_refused(schema):
    def twice(grid):
        grid["tables"][1]["rows"].append({**grid["tables"][1]["rows"][1], "method": "CLL2"})
        grid["tables"][1]["rows"][-1]["set"] = {**grid["tables"][1]["rows"][1]["set"], "lr": 0.5}

    assert "appears twice with different settings" in grid_error(schema, twice)


def test_pending_rows_may_name_what_does_not_exist_yet(schema):
    grid = copy.deepcopy(CI_GRID)
    grid["tables"][1]["rows"].append(
        {"method": "Local-Lip-B", "dataset": "digits", "arch": "LocalLip", "loss": "llb", "eps": 0.15, "pending": "x"}
    )
    cells = parse_grid(grid, schema).cells
    assert [c.arch for c in cells if c.pending] == ["LocalLip"]


def test_the_workflow_schema_file_gives_the_same_cells(schema):
    """The workflow reads workflow/schemas/config.schema.yaml (no torch); the cells are the same."""
    from_file = yaml.safe_load((ROOT / workflow.SCHEMA).read_text())
    for path in GRIDS:
        values = yaml.safe_load(path.read_text())
        assert parse_grid(values, from_file).cells == parse_grid(values, schema).cells


def test_unreadable_grid_files_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_grid(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("tables: [\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_grid(tmp_path / "bad.yaml")


# ----------------------------------------------------------------------------- cells
def test_rows_expand_over_eps_p_and_seeds(schema):
    grid = copy.deepcopy(CI_GRID)
    grid["tables"][1]["rows"][1].update(eps=[0.15, "36/255"], p=[0.3, 0.1], seeds=[0, 1])
    cells = [c for c in parse_grid(grid, schema).cells if c.method == "CLL" and c.table == "digits"]
    assert len(cells) == 8
    assert {(round(c.eps, 4), c.p, c.seed) for c in cells} == {
        (e, p, s) for e in (0.15, 0.1412) for p in (0.3, 0.1) for s in (0, 1)
    }


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: str(p.relative_to(ROOT)))
def test_set_args_round_trip_to_the_cells_run_config(path):
    """cell -> `cll train --set ...` (shell-quoted, as the train rule writes it) -> the same run config."""
    cells = load_grid(path).runnable()
    assert cells
    for cell in cells:
        argv = shlex.split(workflow.set_args(cell))
        assert build_config(parse_overrides(argv)) == cell.run_config(), cell


def test_set_args_round_trip_awkward_values(schema):
    grid = copy.deepcopy(CI_GRID)
    awkward = {
        "lr": 1e-3,  # YAML writes 0.001
        "lip_penalty": 1.0e-6,  # 1.0e-06
        "weight_decay": 5e-324,  # the smallest float
        "momentum": 0.1 + 0.2,  # not a short decimal
        "certify_eps": ["36/255", 0.5],  # a fraction stays text
        "milestones": [1, 2],
        "betas": [0.5, 0.875],
        "max_test": None,
        "augment": False,
        "data_root": "/data/with space/and'quote",
        "cll_offset": "one-sided",
    }
    grid["tables"][1]["rows"][1]["set"].update(awkward)
    (cell,) = [c for c in parse_grid(grid, schema).runnable() if c.method == "CLL" and c.table == "digits"]
    values = parse_overrides(shlex.split(workflow.set_args(cell)))
    assert build_config(values) == cell.run_config()
    assert values["weight_decay"] == 5e-324 and values["momentum"] == 0.1 + 0.2
    assert values["certify_eps"] == ["36/255", 0.5] and values["data_root"] == awkward["data_root"]


def test_cell_directory_matches_the_workflow_pattern():
    for cell in load_grid(ROOT / "config" / "paper.yaml").runnable():
        keys = dict(dataset=cell.dataset, arch=cell.arch, loss=cell.loss, seed=cell.seed)
        keys.update(eps=results.fmt_number(cell.eps), p=results.fmt_number(cell.p))
        assert results.run_pattern("res").format(**keys) == str(cell.path("res"))


def test_job_resources_default_and_per_row():
    grid = copy.deepcopy(CI_GRID)
    grid["tables"][1]["rows"][1]["resources"] = {"gpus": 4, "mem_mb": 16000}
    plain, big = (c for c in parse_grid(grid).runnable() if c.table == "digits")
    defaults = {name: value for name, (value, _) in RESOURCES.items()}
    expected = {"gpu": defaults["gpus"], "runtime": defaults["runtime"], "mem_mb": defaults["mem_mb"]}
    assert plain.job_resources("train") == {**expected, "cpus_per_task": defaults["cpus"]}
    assert big.job_resources("train") == {"gpu": 4, "runtime": 60, "mem_mb": 16000, "cpus_per_task": 1}
    for rule in ("certify", "audit"):  # at most one GPU outside training
        assert big.job_resources(rule) == {"gpu": 1, "runtime": 60, "mem_mb": 16000, "cpus_per_task": 1}


# ------------------------------------------------------------------ published numbers, audit budget
POSTER = {"source": "Losch et al., GCPR 2023, poster", "clean": 0.398, "eps": ["36/255", 0.15], "cra": [0.259, 0.3]}


def test_published_block_becomes_fractions_by_eps_key():
    (cell,) = parse_grid(moons_grid(published={**POSTER, "k_hf": "10.6"})).cells
    assert cell.published == {
        "source": "Losch et al., GCPR 2023, poster",
        "clean": 0.398,
        "cra": {"0.1412": 0.259, "0.15": 0.3},
        "k_hf": 10.6,
    }
    (cell,) = parse_grid(moons_grid(published={"source": "S", "k_hf": 3.4})).cells
    assert cell.published == {"source": "S", "clean": None, "cra": {}, "k_hf": 3.4}
    assert parse_grid(moons_grid()).cells[0].published is None


def _without(key):
    block = copy.deepcopy(POSTER)
    del block[key]
    return block


@pytest.mark.parametrize(
    "block, message",
    [
        ({**POSTER, "clean": 39.8}, "published.clean: 39.8 is greater than the maximum of 1"),
        ({**POSTER, "cra": [0.259, 30]}, "published.cra[1]: 30 is greater than the maximum of 1"),
        (_without("source"), "published: 'source' is a required property"),
        (_without("cra"), "published: 'cra' is a dependency of 'eps'"),
        ({**POSTER, "cra": [0.259]}, "published: eps ['36/255', 0.15] and cra [0.259] must be lists of the same"),
        ({**POSTER, "eps": ["36/255", "x"]}, "published.eps[1]: 'x' is not a number"),
        ({**POSTER, "eps": [0.1, -0.2]}, "published.eps[1]: -0.2 is less than or equal to the minimum of 0"),
        ({**POSTER, "eps": [0.1, "-1/5"]}, "published.eps[1]: '-1/5' is not allowed; expected a number > 0"),
        ({**POSTER, "k_hf": 0}, "published.k_hf: 0 is less than or equal to the minimum of 0"),
        ({**POSTER, "clen": 0.3}, "published: Additional properties are not allowed ('clen' was unexpected)"),
        ({"source": "S"}, "published: gives none of clean, cra, k_hf; give at least one"),
        ("39.8", "published: '39.8' is not of type 'object'"),
    ],
    ids=["percent", "cra-percent", "no-source", "eps-alone", "lengths", "eps-text", "eps-negative",
         "eps-negative-text", "k-zero", "unknown-key", "no-number", "not-a-mapping"],
)  # fmt: skip
def test_malformed_published_block_is_one_line(block, message):
    with pytest.raises(ConfigError) as err:
        parse_grid(moons_grid(published=block))
    text = str(err.value)
    assert text.startswith("tables[0].rows[0]." + message) and "\n" not in text, text


def test_published_numbers_need_a_row_of_one_eps_and_one_p():
    with pytest.raises(ConfigError, match=r"^tables\[0\]\.rows\[0\]\.published: the row expands into several"):
        parse_grid(moons_grid(p=[0.75, 0.25], published=POSTER))
    with pytest.raises(ConfigError, match="give one row per eps and p"):
        parse_grid(moons_grid(eps=[0.1, 0.2], published=POSTER))
    assert len(parse_grid(moons_grid(seeds=[1, 2], published=POSTER)).cells) == 2  # seeds are fine


def test_audit_setting_over_the_defaults():
    (cell,) = parse_grid(moons_grid()).cells
    assert cell.audit == AUDIT_DEFAULTS and cell.audit_args() == "--n 100 --steps 30 --restarts 2"
    (cell,) = parse_grid(moons_grid(audit={"n": 500, "restarts": 5})).cells
    assert cell.audit_args() == "--n 500 --steps 30 --restarts 5"


@pytest.mark.parametrize(
    "audit, message",
    [
        ({"n": 0}, "audit.n: 0 is less than the minimum of 1"),
        ({"steps": 2.5}, "audit.steps: 2.5 is not of type 'integer'"),
        ({"steps": True}, "audit.steps: True is not of type 'integer'"),
        ({"attacks": 3}, "audit: Additional properties are not allowed ('attacks' was unexpected)"),
        (None, "audit: None is not of type 'object'"),
    ],
)
def test_malformed_audit_setting_is_one_line(audit, message):
    with pytest.raises(ConfigError) as err:
        parse_grid(moons_grid(audit=audit))
    assert str(err.value) == "tables[0].rows[0]." + message
