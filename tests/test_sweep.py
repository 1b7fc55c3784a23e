"""`perp.sweep`: the grid a sweep runs and how it judges the points (the flow itself is tested in test_flows.py)."""

from __future__ import annotations

import pytest

from perp import sweep as plan
from perp.config import dump_params
from perp.errors import ConfigError
from perp.pipeline import config_from_sections


def base(**register: object) -> dict:
    return dump_params(config_from_sections(register={"store": "/tmp/unused-store", "name": "m", **register}))


def test_grid_is_every_combination_validated_before_anything_runs():
    points = plan.grid(base(), ["wanda", "magnitude"], [0.5, 0.6], ["norm"])
    assert [(p["prune"]["method"], p["prune"]["sparsity"], p["recover"]["method"]) for p in points] == [
        ("wanda", 0.5, "norm"), ("wanda", 0.6, "norm"), ("magnitude", 0.5, "norm"), ("magnitude", 0.6, "norm")]
    assert len({plan.prune_key(p) for p in points}) == 4
    assert plan.prune_key(plan.grid(base(), ["wanda"], [0.5], ["norm", "masklora"])[1]) == plan.prune_key(points[0])
    with pytest.raises(ConfigError, match="sparsity"):
        plan.grid(base(), ["wanda"], [1.5], ["norm"])
    with pytest.raises(ConfigError, match="nonesuch"):
        plan.grid(base(), ["nonesuch"], [0.5], ["norm"])


def test_request_names_fail_early_and_the_last_stage_judges_by_default():
    assert plan.check_request("ppl_ratio", None, ["dev", "prod"]) == "prod"
    assert plan.check_request("sparsity", "dev", ["dev", "prod"]) == "dev"
    with pytest.raises(ConfigError, match="objective 'speed' is unknown"):
        plan.check_request("speed", None, ["dev", "prod"])
    with pytest.raises(ConfigError, match="gate_stage 'qa' is not a stage"):
        plan.check_request("ppl_ratio", "qa", ["dev", "prod"])


def _metrics(sparsity: float, ppl_ratio: float) -> dict:
    """The parts of metrics.json the gates read: measured figures and the target the sparsity is checked against."""
    return {"target_sparsity": 0.4, "gates": {"sparsity": sparsity, "ppl_ratio": ppl_ratio}}


def _rows() -> list[dict]:
    point = plan.grid(base(gates={"prod": {"max_ppl_ratio": 1.5, "max_zeroshot_drop": None}}), ["wanda"], [0.5],
                      ["norm"])[0]
    figures = [(0.5, 1.2), (0.6, 1.6), (0.6, 1.4), (0.4, 1.3), (None, None)]
    return [plan.result_row(i, point, _metrics(s, r) if s else {}, f"m{i}.json", "prod")
            for i, (s, r) in enumerate(figures)]


def test_rows_carry_the_verdict_and_the_front_drops_dominated_and_unmeasured_points():
    rows = _rows()
    assert [row["passes_gates"] for row in rows] == [True, False, True, True, False]
    assert rows[1]["failed_gates"] == "ppl_ratio" and rows[4]["sparsity"] is None
    assert [row["point"] for row in plan.front(rows)] == [0, 2]  # (0.4, 1.3) and (0.6, 1.6) are dominated


def test_best_follows_the_objective_and_filters_by_gates_only_when_asked():
    rows = _rows()
    assert plan.best(rows, "ppl_ratio", filter_by_gates=True)["point"] == 0
    assert plan.best(rows, "sparsity", filter_by_gates=False)["point"] in (1, 2)
    assert plan.best(rows, "sparsity", filter_by_gates=True)["point"] == 2  # point 1 fails prod's gates
    assert plan.best(rows, "zeroshot_drop", filter_by_gates=False) is None  # nothing measured it
    assert plan.choice_line(None, "ppl_ratio", "prod", True) == "no point passes the 'prod' gates"
    line = plan.choice_line(rows[0], "ppl_ratio", "prod", True)
    assert line == "best by ppl_ratio (min) under the 'prod' gates: point 0 (wanda 0.5 + norm)"
    assert "| 0.500 | 1.200 | wanda | norm |" in plan.summary_markdown(line, plan.front(rows))
