"""`ola eval`: a checkpoint's benchmark numbers (CV-Bench, generic multiple choice), resumable."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .errors import user_errors
from .groups import Groups


def eval_command(
    checkpoint: str = typer.Argument(
        ..., help="olavlm model / checkpoint / run folder, or an exported LLaVA folder."
    ),
    bench: str = typer.Option(
        ..., "--bench", help="'cvbench' (CV-Bench as published) or 'mc' (generic multiple choice)."
    ),
    data: list[Path] = typer.Option(
        ...,
        "--data",
        help="The questions (repeatable: all are read): the CV-Bench folder (test_2d/test_3d .parquet, "
        "or .jsonl with img/) or its files; an mc .parquet/.jsonl.",
    ),
    out: Path = typer.Option(
        Path("eval-out"),
        "--out",
        help="Folder for predictions.jsonl, results.json/.csv (with --compare: one subfolder per model).",
    ),
    mode: str = typer.Option(
        "generate",
        "--mode",
        help="'generate' (greedy reply, parsed) or 'likelihood' (the option the model finds most likely).",
    ),
    continuation: str = typer.Option(
        "letter",
        "--continuation",
        help="Likelihood mode: score the option 'letter' or its 'text' (per byte).",
    ),
    compare: str | None = typer.Option(
        None,
        "--compare",
        help="A second checkpoint, evaluated identically: both side by side, the difference "
        "CHECKPOINT - COMPARE, paired bootstrap CI.",
    ),
    limit: int = typer.Option(
        0, "--limit", min=0, help="Only N questions, round-robin over tasks (0 = all)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Questions per forward / generate call."),
    max_new_tokens: int = typer.Option(
        32, "--max-new-tokens", min=1, help="Generation mode: most tokens per reply."
    ),
    image_aspect_ratio: str = typer.Option(
        "",
        "--image-aspect-ratio",
        help="'pad' or 'crop' (default: as the model was trained, from its processor).",
    ),
    resamples: int = typer.Option(2000, "--resamples", min=100, help="Bootstrap resamples for --compare."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results (and comparison) as JSON."),
) -> None:
    """Score CHECKPOINT on a multiple-choice benchmark and print the paper's table columns.

    CV-Bench is aggregated as its card defines it (2D = mean of ADE20K and COCO, 3D = Omni3D, overall = mean of 2D and 3D). Rerunning with the same --out resumes: scored questions are kept."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from olavlm.trainer.eval.benchmark import format_comparison, format_table, run_eval

    checkpoints = [checkpoint] + ([compare] if compare else [])
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with user_errors(), Progress(*columns, disable=as_json) as bar:
        tasks: dict[str, int] = {}

        def progress(label: str, done: int, total: int) -> None:
            if label not in tasks:  # resumed questions are not part of the rate
                tasks[label] = bar.add_task(f"eval {label}", total=total, completed=done, rate="")
                return
            speed = bar.tasks[tasks[label]].speed
            bar.update(tasks[label], completed=done, rate=f"{speed:.2f} q/s" if speed else "")

        report = run_eval(
            checkpoints,
            bench=bench,
            data=data,
            out=out,
            mode=mode,
            continuation=continuation,
            limit=limit,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            image_aspect_ratio=image_aspect_ratio,
            device=device,
            resamples=resamples,
            seed=seed,
            progress=progress,
        )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(format_table(report["results"]))
    if "comparison" in report:
        c = report["comparison"]
        typer.echo("")
        typer.echo(format_comparison(c, c["a"], c["b"]))
    for label, r in report["results"].items():
        if r.get("partial"):
            typer.echo(
                f"{label}: partial CV-Bench, no questions of {', '.join(r['partial'])}: "
                "those columns (and 2D / 3D / Overall where they need them) are left out"
            )
        if r["unparsed"]:
            shown = ", ".join(r["unparsed"][:10]) + (" ..." if len(r["unparsed"]) > 10 else "")
            typer.echo(f"{label}: {len(r['unparsed'])} unparsed replies, counted wrong: {shown}")
    typer.echo(
        f"wrote {out}/"
        + ("{" + ",".join(report["results"]) + "}/" if compare else "")
        + "predictions.jsonl, results.json, results.csv"
        + (f", {out}/comparison.json" if compare else "")
    )


def register(groups: Groups) -> None:
    """Add this module's commands to `groups`."""
    groups.root.command("eval")(eval_command)
