"""Tests for the grid keys of src/cll/grid.py that carry no run config: a row's ``published``
block (what its paper reports) and its ``audit`` setting. Malformed blocks fail with one line
naming the field and what is allowed (the workflow's schema checks are in test_workflow.py)."""

from __future__ import annotations

import copy

import pytest

from cll.errors import ConfigError
from cll.grid import AUDIT_DEFAULTS, parse_grid

ROW = {"method": "CLL", "dataset": "moons", "arch": "moons-mlp", "loss": "cll", "eps": 0.15, "p": 0.01}
POSTER = {"source": "Losch et al., GCPR 2023, poster", "clean": 0.398, "eps": ["36/255", 0.15], "cra": [0.259, 0.3]}


def grid_with(**row) -> dict:
    return {"experiment": "x", "tables": [{"name": "t", "rows": [{**ROW, **row}]}]}


def test_published_block_becomes_fractions_by_eps_key():
    (cell,) = parse_grid(grid_with(published={**POSTER, "k_hf": "10.6"})).cells
    assert cell.published == {
        "source": "Losch et al., GCPR 2023, poster",
        "clean": 0.398,
        "cra": {"0.1412": 0.259, "0.15": 0.3},
        "k_hf": 10.6,
    }
    (cell,) = parse_grid(grid_with(published={"source": "S", "k_hf": 3.4})).cells
    assert cell.published == {"source": "S", "clean": None, "cra": {}, "k_hf": 3.4}
    assert parse_grid(grid_with()).cells[0].published is None


def _without(key):
    block = copy.deepcopy(POSTER)
    del block[key]
    return block


@pytest.mark.parametrize(
    "block, message",
    [
        ({**POSTER, "clean": 39.8}, "published.clean: 39.8 is not a fraction in [0, 1] (write 39.8 % as 0.398)"),
        ({**POSTER, "cra": [0.259, 30]}, "published.cra[1]: 30 is not a fraction in [0, 1]"),
        (_without("source"), "published.source: missing; name the paper and table the numbers come from"),
        (_without("cra"), "published: eps and cra go together (cra[i] is the CRA at radius eps[i])"),
        ({**POSTER, "cra": [0.259]}, "published: eps ['36/255', 0.15] and cra [0.259] must be lists of the same"),
        ({**POSTER, "eps": ["36/255", "x"]}, "published.eps[1]: 'x' is not a number"),
        ({**POSTER, "eps": [0.1, -0.2]}, "published.eps[1]: -0.2 is not a radius > 0"),
        ({**POSTER, "k_hf": 0}, "published.k_hf: 0 is not a constant > 0"),
        ({**POSTER, "clen": 0.3}, "published: unknown key 'clen'; allowed: clean, cra, eps, k_hf, source"),
        ({"source": "S"}, "published: gives no number; give clean, eps + cra, or k_hf"),
        ("39.8", "published: must be a mapping"),
    ],
    ids=["percent", "cra-percent", "no-source", "eps-alone", "lengths", "eps-text", "eps-negative", "k-zero",
         "unknown-key", "no-number", "not-a-mapping"],
)  # fmt: skip
def test_malformed_published_block_is_one_line(block, message):
    with pytest.raises(ConfigError) as err:
        parse_grid(grid_with(published=block))
    text = str(err.value)
    assert text.startswith("tables[0].rows[0]." + message) and "\n" not in text, text


def test_published_numbers_need_a_row_of_one_eps_and_one_p():
    with pytest.raises(ConfigError, match=r"^tables\[0\]\.rows\[0\]\.published: the row expands into several"):
        parse_grid(grid_with(p=[0.75, 0.25], published=POSTER))
    with pytest.raises(ConfigError, match="give one row per eps and p"):
        parse_grid(grid_with(eps=[0.1, 0.2], published=POSTER))
    assert len(parse_grid(grid_with(seeds=[1, 2], published=POSTER)).cells) == 2  # seeds are fine


def test_audit_setting_over_the_defaults():
    (cell,) = parse_grid(grid_with()).cells
    assert cell.audit == AUDIT_DEFAULTS and cell.audit_args() == "--n 100 --steps 30 --restarts 2"
    (cell,) = parse_grid(grid_with(audit={"n": 500, "restarts": 5})).cells
    assert cell.audit_args() == "--n 500 --steps 30 --restarts 5"


@pytest.mark.parametrize(
    "audit, message",
    [
        ({"n": 0}, "audit.n: 0 is not an integer >= 1"),
        ({"steps": 2.5}, "audit.steps: 2.5 is not an integer >= 1"),
        ({"steps": True}, "audit.steps: True is not an integer >= 1"),
        ({"attacks": 3}, "audit: unknown key 'attacks'; allowed: n, restarts, steps"),
        (None, "audit: must be a mapping with n, steps and/or restarts"),
    ],
)
def test_malformed_audit_setting_is_one_line(audit, message):
    with pytest.raises(ConfigError) as err:
        parse_grid(grid_with(audit=audit))
    assert str(err.value) == "tables[0].rows[0]." + message
