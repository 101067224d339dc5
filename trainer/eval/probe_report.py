"""Reporting of probe scores: per-layer mean and spread over probe seeds, paired differences, CSV, plot.

Rows come from `probe.run_probe`: one per (checkpoint, teacher, layer, seed).
Design choice: a comparison of two checkpoints is *paired by probe seed* (the
same seed gives both checkpoints' probes the same initialisation and data
order), and its spread is the standard deviation of the per-seed differences.
With one seed there is no spread: the table says so rather than printing 0.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (checkpoint, teacher, layer), sorted."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["checkpoint"], r["teacher"], r["layer"])].append(r)
    out = []
    for (checkpoint, teacher, layer), mine in sorted(groups.items()):
        scores = [r["score"] for r in mine]
        out.append(
            {
                "checkpoint": checkpoint,
                "teacher": teacher,
                "layer": layer,
                "mean": statistics.fmean(scores),
                "std": _std(scores),
                "seeds": len(scores),
                "distilled": any(r["distilled"] for r in mine),
            }
        )
    return out


def paired_difference(
    rows: list[dict], a: str, b: str, teacher: str, *, distilled_only: bool
) -> tuple[float, float, int]:
    """Checkpoint `a` minus `b` for one teacher, paired by probe seed: each seed's difference of the mean
    over layers (`a`'s distilled layers only if asked) -> (mean, std over seeds, seeds); NaN mean if none."""
    layers = {
        r["layer"]
        for r in rows
        if r["checkpoint"] == a and r["teacher"] == teacher and (r["distilled"] or not distilled_only)
    }
    score = {(r["checkpoint"], r["layer"], r["seed"]): r["score"] for r in rows if r["teacher"] == teacher}
    per_seed: dict[int, list[float]] = defaultdict(list)
    for (checkpoint, layer, seed), value in score.items():
        if checkpoint == a and layer in layers and (b, layer, seed) in score:
            per_seed[seed].append(value - score[(b, layer, seed)])
    means = [statistics.fmean(v) for v in per_seed.values()]
    return (statistics.fmean(means) if means else math.nan), _std(means), len(means)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def print_scores(rows: list[dict], compare: tuple[str, str] | None = None) -> None:
    """Per (checkpoint, teacher): mean over layers, best layer, mean at the distilled layers (± std over seeds);
    with `compare` = (a, b), the paired a - b difference per teacher at a's distilled layers and overall."""
    table = summarise(rows)
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in table:
        groups[(r["checkpoint"], r["teacher"])].append(r)
    seeds = max((r["seeds"] for r in table), default=0)
    print(
        f"probe scores (held-out cosine; ± = std over {seeds} probe seeds)"
        if seeds > 1
        else "probe scores (held-out cosine; one probe seed: no spread, use --seeds K)"
    )
    print(f"{'checkpoint':<20} {'teacher':<8} {'mean':>8} {'best (layer)':>14} {'at distilled':>20}")
    for (checkpoint, teacher), mine in sorted(groups.items()):
        best = max(mine, key=lambda r: r["mean"])
        distilled = [r for r in mine if r["distilled"]]
        at = (
            _pm(statistics.fmean(r["mean"] for r in distilled), _seed_std(rows, checkpoint, teacher, True))
            if distilled
            else "-"
        )
        print(
            f"{checkpoint:<20} {teacher:<8} {statistics.fmean(r['mean'] for r in mine):>8.4f} "
            f"{best['mean']:>7.4f} ({best['layer']:>2}) {at:>20}"
        )
    if compare:
        a, b = compare
        print(f"\n{a} - {b}, paired by probe seed (mean ± std of the per-seed differences)")
        print(f"{'teacher':<8} {'at distilled layers':>24} {'all layers':>24}")
        for teacher in sorted({r["teacher"] for r in rows}):
            cells = []
            for distilled_only in (True, False):
                mean, std, n = paired_difference(rows, a, b, teacher, distilled_only=distilled_only)
                cells.append("-" if not n else f"{mean:+.4f}" + ("" if n < 2 else f" ± {std:.4f}"))
            print(f"{teacher:<8} {cells[0]:>24} {cells[1]:>24}")


def _seed_std(rows: list[dict], checkpoint: str, teacher: str, distilled_only: bool) -> float:
    """Std over seeds of the per-seed mean over layers (distilled ones only if asked)."""
    per_seed: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if (
            r["checkpoint"] == checkpoint
            and r["teacher"] == teacher
            and (r["distilled"] or not distilled_only)
        ):
            per_seed[r["seed"]].append(r["score"])
    return _std([statistics.fmean(v) for v in per_seed.values()])


def write_csv(rows: list[dict], path: Path) -> None:
    """One line per (checkpoint, teacher, layer): mean and std over seeds."""
    with open(path, "w") as f:
        f.write("checkpoint,teacher,layer,score,score_std,seeds,distilled\n")
        for r in summarise(rows):
            std = "" if math.isnan(r["std"]) else f"{r['std']:.6f}"
            f.write(
                f"{r['checkpoint']},{r['teacher']},{r['layer']},{r['mean']:.6f},{std},{r['seeds']},"
                f"{int(r['distilled'])}\n"
            )


PANEL_INCHES = (4.2, 3.4)
"""Size of one teacher's panel; the PNG is (teachers x 4.2 in) x 3.4 in at `dpi`."""


def plot_size(teachers: int, dpi: int = 100) -> tuple[int, int]:
    """Pixel size (width, height) of the probe plot for this many teachers."""
    return round(PANEL_INCHES[0] * teachers * dpi), round(PANEL_INCHES[1] * dpi)


def plot_probe(rows: list[dict], out: str, dpi: int = 100) -> tuple[int, int]:
    """Score against layer, one panel per teacher, one line per checkpoint (error bars: std over seeds);
    distilled layers circled. Returns the PNG's pixel size, `plot_size(len(teachers), dpi)`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    table = summarise(rows)
    teachers = sorted({r["teacher"] for r in table})
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in rows))
    fig, axes = plt.subplots(
        1, len(teachers), figsize=(PANEL_INCHES[0] * len(teachers), PANEL_INCHES[1]), dpi=dpi, squeeze=False
    )
    for ax, teacher in zip(axes[0], teachers):
        for checkpoint in checkpoints:
            mine = [r for r in table if r["teacher"] == teacher and r["checkpoint"] == checkpoint]
            if not mine:
                continue
            errors = [0.0 if math.isnan(r["std"]) else r["std"] for r in mine]
            bars = ax.errorbar(
                [r["layer"] for r in mine],
                [r["mean"] for r in mine],
                yerr=errors,
                marker=".",
                capsize=2,
                label=checkpoint,
            )
            marked = [r for r in mine if r["distilled"]]
            ax.scatter(
                [r["layer"] for r in marked],
                [r["mean"] for r in marked],
                s=90,
                facecolors="none",
                edgecolors=bars.lines[0].get_color(),
                linewidths=1.5,
            )
        ax.set_title(f"{teacher} (o = distilled layer)", fontsize=9)
        ax.set_xlabel("LLM layer (hidden_states[i])")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("probe cosine (held-out)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)  # no bbox_inches="tight": the pixel size stays exactly plot_size()
    plt.close(fig)
    return plot_size(len(teachers), dpi)
