"""Human-facing outputs of a run: the metric curves as a PNG and the result table."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.table import Table

PLOTTED = ("accuracy", "auc", "logloss", "loss")


def plot_metrics(records: list[dict[str, Any]], path: Path, *, title: str) -> None:
    """One panel per metric over rounds/epochs/steps (the record's `step`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for record in records:
        x = record.get("step")
        if x is None:
            continue
        for name in PLOTTED:
            value = record.get(name)
            if isinstance(value, int | float):
                series[name].append((x, value))
    if not series:
        return
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], sorted(series.items()), strict=True):
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", markersize=3)
        ax.set_title(name)
        ax.set_xlabel(records[-1].get("unit", "round"))
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def result_table(summaries: list[dict[str, Any]]) -> Table:
    """One row per job: mode, metric, wall time, and whether every party was attested."""
    table = Table(title="enclavefl results")
    for column in ("job", "mode", "strategy", "metric", "value", "wall s", "parties attested"):
        table.add_column(column)
    for s in summaries:
        metrics = s.get("metrics", {})
        name, value = next(
            ((m, metrics[m]) for m in ("auc", "accuracy") if isinstance(metrics.get(m), int | float)),
            ("-", None),
        )
        parties = s.get("parties", {})
        attested = sum(1 for p in parties.values() if p.get("attested"))
        table.add_row(
            s.get("job", "?"),
            s.get("mode", "?"),
            str(s.get("strategy", s.get("alignment", "-"))),
            name,
            "-" if value is None else f"{value:.4f}",
            f"{s.get('wall_s', 0):.1f}",
            f"{attested}/{len(parties)}",
        )
    return table
