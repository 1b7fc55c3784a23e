"""Promotion gates: thresholds from params.yaml (`register.gates.<stage>`) checked against a version's metrics.

The evaluation stage writes `metrics.json`; the gates read its `gates` section:

    {
      "sparsity": 0.5,                      # measured: exact zeros over the decoder Linear weights
      "target_sparsity": 0.5,               # nominal (prune.sparsity, or (M-N)/M)
      "planned_sparsity": 0.4999,           # exact: what the pruning plan zeroes, over the same weights
      "perplexity": {"<text>": {"ppl": 21.3, "dense_ppl": 18.2, "ratio": 1.17}},
      "zeroshot": {"mean_acc": 0.52, "dense_mean_acc": 0.53, "drop_points": 1.0},
      "gates": {"ppl_ratio": 1.17,          # max over the perplexity texts
                "zeroshot_drop_points": 1.0, # null when no zero-shot task ran
                "sparsity": 0.5}
    }

Gates (each `null` in the config switches it off):

- ``ppl_ratio``: ``gates.ppl_ratio <= max_ppl_ratio``;
- ``zeroshot_drop``: ``gates.zeroshot_drop_points <= max_zeroshot_drop``;
- ``sparsity``: ``gates.sparsity >= min_sparsity``; when `min_sparsity` is null and metrics.json has the counts,
  ``model.decoder_linear_zeros >= planned_pruned_weights`` exactly; else ``>= planned_sparsity - 1e-6``
  (the plan's exact count: per-row rounding makes the achieved sparsity differ from the nominal target, e.g.
  floor(0.6 x 64) / 64 = 0.59375, but never from the plan; the tolerance only absorbs float division). Metrics
  without `planned_sparsity` (written before it existed) fall back to ``>= target_sparsity - 0.0005``;
- ``previous_stage``: promoting to stage *i* > 0 needs the version to have been promoted to stage *i - 1* before
  (dev → staging → prod).

Gates fail closed: a metric that is missing, null or not finite fails its gate ("not measured"), since a
promotion without evidence is not a checked one. Waive a gate by setting its threshold to null, or override one
promotion with ``--force --reason``, which the audit trail records together with the failed gates.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from perp.config import GatesConfig

PLANNED_SPARSITY_TOLERANCE = 1e-6  # achieved vs planned: the same exact count, over the same weights
SPARSITY_TOLERANCE = 5e-4  # achieved vs nominal target (older metrics only): absorbs per-row rounding


def _whole_counts(metrics: dict[str, Any]) -> Optional[tuple[int, int]]:
    """(zeroed, planned) decoder Linear weights, when metrics.json records both as whole numbers: compared
    exactly, with no tolerance."""
    zeros = (metrics.get("model") or {}).get("decoder_linear_zeros")
    planned = metrics.get("planned_pruned_weights")
    if isinstance(zeros, int) and isinstance(planned, int) and not isinstance(zeros, bool) \
            and not isinstance(planned, bool):
        return zeros, planned
    return None


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _check(gate: str, metric: str, op: str, threshold: float, raw: Any, label: str) -> dict[str, Any]:
    value = _number(raw)
    check: dict[str, Any] = {"gate": gate, "metric": metric, "op": op, "threshold": threshold,
                             "value": raw if value is None else value}
    if value is None:
        shown = "missing" if raw is None else repr(raw)
        check.update(passed=False, by=None,
                     detail=f"{label} not measured (metrics {metric} is {shown}); required {op} {threshold:g}")
        return check
    if op == "<=":
        passed, by = value <= threshold, value - threshold
        verb = "exceeds the maximum"
    else:
        passed, by = value >= threshold, threshold - value
        verb = "is below the minimum"
    check.update(passed=passed, by=round(by, 6) if not passed else 0.0)
    if passed:
        check["detail"] = f"{label} {_shown(value)} {op} {_shown(threshold)}"
    else:
        check["detail"] = f"{label} {_shown(value)} {verb} {_shown(threshold)} by {_shown(by)}"
    return check


def _shown(number: float) -> str:
    """Counts (whole numbers) in full, everything else to 4 significant digits."""
    return f"{int(number)}" if float(number).is_integer() and abs(number) < 1e15 else f"{number:.4g}"


def evaluate_gates(stage: str, stages: list[str], config: Optional[GatesConfig | dict[str, Any]],
                   metrics: Optional[dict[str, Any]], stages_ever: set[str]) -> dict[str, Any]:
    """The gate evidence for promoting a version to `stage`: every check with its threshold and value.

    `config` is the stage's GatesConfig (or its dict form; None: no metric gates); `stages_ever` the stages the
    version was promoted to before. Pure: reads nothing, writes nothing.
    """
    if config is not None and not isinstance(config, GatesConfig):
        config = GatesConfig.model_validate(config)
    checks: list[dict[str, Any]] = []
    index = stages.index(stage)
    if index > 0:
        previous = stages[index - 1]
        passed = previous in stages_ever
        checks.append({"gate": "previous_stage", "metric": "history", "op": "in", "threshold": previous,
                       "value": sorted(stages_ever), "passed": passed, "by": None,
                       "detail": (f"was promoted to '{previous}' before" if passed else
                                  f"was never promoted to '{previous}' (promote it there first)")})
    metrics = metrics if isinstance(metrics, dict) else {}
    gates = metrics.get("gates")
    measured = gates if isinstance(gates, dict) else {}
    if config is not None:
        if config.max_ppl_ratio is not None:
            checks.append(_check("ppl_ratio", "gates.ppl_ratio", "<=", config.max_ppl_ratio,
                                 measured.get("ppl_ratio"), "perplexity ratio vs dense"))
        if config.max_zeroshot_drop is not None:
            checks.append(_check("zeroshot_drop", "gates.zeroshot_drop_points", "<=", config.max_zeroshot_drop,
                                 measured.get("zeroshot_drop_points"), "zero-shot mean accuracy drop (points)"))
        if config.min_sparsity is not None:
            checks.append(_check("sparsity", "gates.sparsity", ">=", config.min_sparsity,
                                 measured.get("sparsity"), "achieved sparsity"))
        elif (counts := _whole_counts(metrics)) is not None:
            zeros, planned_zeros = counts
            check = _check("sparsity", "model.decoder_linear_zeros", ">=", planned_zeros, zeros,
                           f"zeroed decoder weights (planned {planned_zeros})")
            check["planned"] = _number(metrics.get("planned_sparsity"))
            check["target"] = _number(metrics.get("target_sparsity"))
            checks.append(check)
        elif _number(metrics.get("planned_sparsity")) is not None:
            planned = float(metrics["planned_sparsity"])
            check = _check("sparsity", "gates.sparsity", ">=", planned - PLANNED_SPARSITY_TOLERANCE,
                           measured.get("sparsity"), f"achieved sparsity (planned {planned:.6g})")
            check["planned"] = planned
            check["target"] = _number(metrics.get("target_sparsity"))
            checks.append(check)
        else:
            target = _number(metrics.get("target_sparsity"))
            if target is None:
                checks.append({"gate": "sparsity", "metric": "target_sparsity", "op": ">=", "threshold": None,
                               "value": measured.get("sparsity"), "passed": False, "by": None,
                               "detail": "no sparsity target (metrics planned_sparsity and target_sparsity are "
                                         "missing and min_sparsity is null)"})
            else:
                check = _check("sparsity", "gates.sparsity", ">=", target - SPARSITY_TOLERANCE,
                               measured.get("sparsity"), "achieved sparsity")
                check["target"] = target
                checks.append(check)
    failed = [check["gate"] for check in checks if not check["passed"]]
    return {
        "stage": stage,
        "thresholds": config.model_dump(mode="json") if config is not None else None,
        "checks": checks,
        "passed": not failed,
        "failed": failed,
    }


def describe_failures(evaluation: dict[str, Any]) -> str:
    return "; ".join(f"gate {c['gate']} failed: {c['detail']}" for c in evaluation["checks"] if not c["passed"])
