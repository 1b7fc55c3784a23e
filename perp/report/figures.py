"""PNG figures for the report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

STAGE_COLORS = {"dense": "#4c72b0", "pruned": "#c44e52", "recovered": "#55a868", "evaluated": "#8172b2"}
_FALLBACK_COLORS = ("#8172b2", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")
_LAYER_NAME = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<linear>.+)$")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def color(stage: str, index: int = 0) -> str:
    return STAGE_COLORS.get(stage, _FALLBACK_COLORS[index % len(_FALLBACK_COLORS)])


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, facecolor="white")
    _pyplot().close(fig)
    return path


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}"


def grouped_bars(path: Path, groups: Sequence[str], series: Mapping[str, Mapping[str, Optional[float]]], *,
                 title: str, ylabel: str, log_if_spread: bool = False, percent: bool = False,
                 reference: Optional[float] = None) -> Optional[Path]:
    """One group of bars per x label (text or task), one bar per series (dense, pruned, recovered...)."""
    names = [name for name, values in series.items() if any(values.get(g) is not None for g in groups)]
    if not groups or not names:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + len(groups) * (0.5 + 0.35 * len(names))), 4.2))
    width = 0.8 / len(names)
    values_all = []
    for position, name in enumerate(names):
        xs, ys = [], []
        for index, group in enumerate(groups):
            value = series[name].get(group)
            if value is None:
                continue
            xs.append(index - 0.4 + width * (position + 0.5))
            ys.append(value * 100 if percent else value)
        values_all.extend(ys)
        bars = ax.bar(xs, ys, width=width * 0.95, label=name, color=color(name, position))
        for bar, value in zip(bars, ys):
            ax.annotate(f"{value:.1f}" if percent else _fmt(value), (bar.get_x() + bar.get_width() / 2, value),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
    positive = [v for v in values_all if v > 0]
    if log_if_spread and positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    if reference is not None:
        ax.axhline(reference * 100 if percent else reference, color="#888888", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if percent and ax.get_yscale() != "log":
        ax.set_ylim(0, min(100, max(values_all) * 1.15 + 2))
    return _save(fig, path)


def parse_layer_name(name: str) -> tuple[Optional[int], str]:
    """`model.layers.3.self_attn.q_proj` → (3, 'self_attn.q_proj'); unparsable names → (None, name)."""
    match = _LAYER_NAME.match(name)
    if not match:
        return None, name
    return int(match.group("index")), match.group("linear")


def layers_figure(path: Path, layers: dict[str, dict[str, Any]], target: Optional[float] = None) -> Optional[Path]:
    """Per decoder layer, one line per Linear kind: achieved sparsity (top) and reconstruction error (bottom)."""
    from perp.report.collect import number

    rows = []
    for position, (name, stats) in enumerate(layers.items()):
        if not isinstance(stats, dict):
            continue
        index, linear = parse_layer_name(name)
        rows.append((position if index is None else index, linear if index is not None else "linear",
                     number(stats.get("sparsity")), number(stats.get("rel_error"))))
    if not rows:
        return None
    has_error = any(r[3] is not None for r in rows)
    plt = _pyplot()
    panels = 2 if has_error else 1
    fig, axes = plt.subplots(panels, 1, figsize=(9, 3.4 * panels), sharex=True, squeeze=False)
    kinds = list(dict.fromkeys(r[1] for r in rows))
    cmap = plt.get_cmap("tab10")
    for k, kind in enumerate(kinds):
        points = sorted((r[0], r[2], r[3]) for r in rows if r[1] == kind)
        xs = [p[0] for p in points]
        style = {"marker": "o", "markersize": 3, "linewidth": 1.2, "label": kind, "color": cmap(k % 10)}
        axes[0][0].plot(xs, [p[1] for p in points], **style)
        if has_error:
            axes[1][0].plot(xs, [p[2] for p in points], **style)
    if target is not None:
        axes[0][0].axhline(target, color="#888888", linestyle=":", linewidth=1, label=f"target {target:.0%}")
    values = [r[2] for r in rows if r[2] is not None] + ([target] if target is not None else [])
    if values:  # at least 10 points of sparsity on the axis, so that rounding noise does not look like a pattern
        low, high = min(values), max(values)
        middle, half = (low + high) / 2, max((high - low) / 2 * 1.15, 0.05)
        axes[0][0].set_ylim(max(0.0, middle - half), min(1.0, middle + half))
    axes[0][0].set_ylabel("achieved sparsity")
    axes[0][0].set_title("Per-layer sparsity" + (" and reconstruction error" if has_error else ""))
    axes[0][0].grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=min(4, len(kinds) + 1))
    if has_error:
        errors = [r[3] for r in rows if r[3] is not None and r[3] > 0]
        if errors and max(errors) / min(errors) > 100:
            axes[1][0].set_yscale("log")
        axes[1][0].set_ylabel("‖WX − ŴX‖² / ‖WX‖²")
        axes[1][0].grid(alpha=0.3)
    axes[-1][0].set_xlabel("decoder layer")
    return _save(fig, path)


def loss_figure(path: Path, curve: Sequence[Sequence[float]], title: str = "Recovery loss") -> Optional[Path]:
    from perp.report.collect import number

    numbers = [(number(p[0]), number(p[1])) for p in curve if isinstance(p, (list, tuple)) and len(p) >= 2]
    points = [(step, loss) for step, loss in numbers if step is not None and loss is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    steps, losses = [p[0] for p in points], [p[1] for p in points]
    ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="loss")
    window = max(1, len(losses) // 15)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color="#08519c", linewidth=2, label=f"moving mean ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another with at least the sparsity and at most the quality loss, by sparsity."""
    front = []
    for x, y in points:
        dominated = any((ox >= x and oy <= y) and (ox > x or oy < y) for ox, oy in points)
        if not dominated:
            front.append((x, y))
    return sorted(set(front))


def front_figure(path: Path, points: Sequence[dict[str, Any]], dense_acc: Optional[float] = None) -> Optional[Path]:
    """The sparsity × quality front: perplexity ratio (left) and zero-shot mean (right) against sparsity.

    `points`: {label, stage, sparsity, ppl_ratio, mean_acc}; the dense model is the point (0, 1).
    """
    usable = [p for p in points if p.get("sparsity") is not None]
    has_ppl = any(p.get("ppl_ratio") is not None for p in usable)
    has_acc = any(p.get("mean_acc") is not None for p in usable)
    if not usable or not (has_ppl or has_acc):
        return None
    plt = _pyplot()
    panels = [(key, label) for key, label, present in (("ppl_ratio", "perplexity ÷ dense (worst text)", has_ppl),
                                                      ("mean_acc", "zero-shot mean acc (%)", has_acc)) if present]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    stages = list(dict.fromkeys(p["stage"] for p in usable))
    for column, (key, ylabel) in enumerate(panels):
        ax = axes[0][column]
        scale = 100.0 if key == "mean_acc" else 1.0
        for s, stage in enumerate(stages):
            chosen = [p for p in usable if p["stage"] == stage and p.get(key) is not None]
            if not chosen:
                continue
            xs = [p["sparsity"] for p in chosen]
            ys = [p[key] * scale for p in chosen]
            ax.scatter(xs, ys, s=36, color=color(stage, s), label=stage, zorder=3)
            for p, x, y in zip(chosen, xs, ys):
                ax.annotate(p["label"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            oriented = [(x, y if key == "ppl_ratio" else -y) for x, y in zip(xs, ys)]
            front = [(x, y if key == "ppl_ratio" else -y) for x, y in pareto_front(oriented)]
            if len(front) > 1:
                ax.plot([f[0] for f in front], [f[1] for f in front], color=color(stage, s), linewidth=1.2,
                        linestyle="--", zorder=2)
        if key == "ppl_ratio":
            ax.scatter([0.0], [1.0], marker="*", s=120, color=color("dense"), label="dense", zorder=4)
            values = [p[key] for p in usable if p.get(key) is not None] + [1.0]
            if max(values) / max(min(values), 1e-9) > 20:
                ax.set_yscale("log")
        elif dense_acc is not None:
            ax.scatter([0.0], [dense_acc * 100], marker="*", s=120, color=color("dense"), label="dense", zorder=4)
        ax.set_xlabel("sparsity (measured from the weights)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Sparsity × quality front" + ("" if column == 0 else " (zero-shot)"))
    return _save(fig, path)
