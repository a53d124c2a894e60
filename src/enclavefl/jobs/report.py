"""Human-facing outputs of a run: the metric curves as a PNG and the result table."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from enclavefl.validate import is_number

__all__ = [
    "PARTY_PLOTTED",
    "PLOTTED",
    "exported_note",
    "plot_metrics",
    "print_results",
    "result_notes",
    "result_table",
]

PLOTTED = ("accuracy", "auc", "logloss", "macro_f1", "r2", "rmse", "loss")


PARTY_PLOTTED = ("loss", "compute_s", "bytes_sent")


def plot_metrics(records: list[dict[str, Any]], path: Path, *, title: str) -> None:
    """One panel per global metric over rounds/epochs/steps (the record's `step`), then one
    panel per training figure of the parties (`event: party` records), one line per party."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        x = record.get("step")
        if x is None:
            continue
        party = record.get("party") if record.get("event") == "party" else None
        for name in PARTY_PLOTTED if party else PLOTTED:
            value = record.get(name)
            if is_number(value):
                panel = f"party {name}" if party else name
                panels[panel][party or ""].append((x, value))
    if not panels:
        return
    ordered = sorted(p for p in panels if not p.startswith("party ")) + sorted(
        p for p in panels if p.startswith("party ")
    )
    fig, axes = plt.subplots(1, len(ordered), figsize=(4 * len(ordered), 3.2), squeeze=False)
    unit = next((r["unit"] for r in reversed(records) if "unit" in r), "round")
    for ax, name in zip(axes[0], ordered, strict=True):
        for party, points in sorted(panels[name].items()):
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=party or None)
        if len(panels[name]) > 1 or "" not in panels[name]:
            ax.legend(fontsize="small")
        ax.set_title(name)
        ax.set_xlabel(unit)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _headline(summary: dict[str, Any]) -> tuple[str, Any, Any]:
    """The metric a row shows (auc, else accuracy, else r2 or macro_f1), its final value and its best {value, step}."""
    metrics = summary.get("metrics", {})
    best = summary.get("best", {})
    for name in ("auc", "accuracy", "r2", "macro_f1"):
        if isinstance(metrics.get(name), int | float):
            return name, metrics[name], best.get(name)
    return "-", None, None


def result_table(summaries: list[dict[str, Any]]) -> Table:
    """One row per job: mode, metric (final and best), wall time, and who was attested."""
    table = Table(title="enclavefl results")
    for column in ("job", "mode", "strategy", "metric", "final", "best (at)", "wall s", "parties attested"):
        table.add_column(column)
    for s in summaries:
        name, final, best = _headline(s)
        parties = s.get("parties", {})
        attested = sum(1 for p in parties.values() if p.get("attested"))
        if final is None and s.get("failures"):
            final = "failed"
        table.add_row(
            s.get("job", "?"),
            s.get("mode", "?"),
            str(s.get("strategy", s.get("alignment", "-"))),
            name,
            final if isinstance(final, str) else "-" if final is None else f"{final:.4f}",
            "-" if not best else f"{best['value']:.4f} ({best['step']})",
            f"{s.get('wall_s', 0):.1f}",
            f"{attested}/{len(parties)}",
        )
    return table


def result_notes(summary: dict[str, Any]) -> list[str]:
    """What the table cannot say: who failed first and why, who was not attested, health warnings."""
    notes = []
    for failure in summary.get("failures", []):
        lead = "failed first" if failure.get("first") else "then failed"
        notes.append(
            f"{summary.get('job')}: {failure['party']} {lead} (exit {failure['exit_code']}): {failure['error']}"
        )
    for name, party in summary.get("parties", {}).items():
        if not party.get("attested"):
            why = party.get("note") or (
                f"exited {party.get('exit_code')} before attestation completed"
                if party.get("exit_code") not in (0, None)
                else "never attested to its peers"
            )
            notes.append(f"{summary.get('job')}: {name} not attested: {why}")
    notes.extend(f"{summary.get('job')}: WARNING: {w}" for w in summary.get("health", {}).get("warnings", []))
    return notes


def exported_note(summary: dict[str, Any]) -> str | None:
    """With `keep: best`, which epoch's model was exported (the table's final is the last epoch's)."""
    exported = summary.get("exported")
    if not isinstance(exported, dict) or exported.get("keep") != "best":
        return None
    last = "" if exported["epoch"] == summary.get("epochs") else ", not the last"
    best = f"best {exported['by']} {exported['value']:.4f}"
    return f"{summary.get('job')}: exported epoch {exported['epoch']} ({best}){last}"


def print_results(console: Any, summaries: list[dict[str, Any]]) -> None:
    """The result table, then its notes (failures, unattested parties, health warnings)."""
    console.print(result_table(summaries))
    for summary in summaries:
        kept = exported_note(summary)
        if kept:
            console.print(escape(kept))
        for note in result_notes(summary):
            style = "yellow" if "WARNING" in note else "red"
            console.print(f"[{style}]{escape(note)}[/{style}]")
