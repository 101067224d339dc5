"""`ola probe`: layer-wise probes of one or more checkpoints on the same split and budget."""

from __future__ import annotations

from pathlib import Path

import typer

from .errors import user_errors
from .groups import Groups


def _ints(text: str) -> tuple[int, ...]:
    """'0,4,8' or '0-31' or '' -> layer numbers."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        if "-" in part:
            low, high = part.split("-")
            out.extend(range(int(low), int(high) + 1))
        else:
            out.append(int(part))
    return tuple(sorted(set(out)))


def probe(
    checkpoint: str = typer.Argument(..., help="Model, checkpoint or run folder (a run: its latest checkpoint)."),
    data: str = typer.Option(..., "--data", help="WebDataset image-text shards to probe on (folder, pattern, URL)."),
    cache: str = typer.Option(..., "--cache", help="Target cache holding the teachers' targets for --data."),
    out: Path = typer.Option(..., "--out", help="Folder for probe.json, probe.csv and probe.png."),
    compare: list[str] = typer.Option([], "--compare", help="Another checkpoint to probe identically (repeatable), "
                                                          "e.g. the NTP-only baseline."),
    layers: str = typer.Option("", help="LLM layers in the paper's numbering (layer i = hidden_states[i]), "
                                        "e.g. '8,20' or '1-32' (default: all)."),
    teachers: str = typer.Option("", help="Comma-separated teachers (default: all in the cache)."),
    steps: int = typer.Option(200, help="Probe training steps per checkpoint."),
    batch_size: int = typer.Option(8, help="Samples per probe step."),
    lr: float = typer.Option(1e-3, help="Probe learning rate."),
    width: int = typer.Option(256, help="Probe head width."),
    heldout_percent: int = typer.Option(20, help="Percent of keys held out for scoring (chosen by key hash)."),
    num_workers: int = typer.Option(0, help="DataLoader workers."),
    seed: int = typer.Option(0, help="Data order seed, and the first probe initialisation."),
    seeds: int = typer.Option(1, help="Probe initialisations per (teacher, layer): mean and std are reported."),
    prompt: str = typer.Option("Describe the image in two lines.", help="Fixed user prompt after the image (no answer is read)."),
    image_aspect_ratio: str = typer.Option("pad", help="'pad' (the authors' probing) or 'crop'."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
) -> None:
    """Layer-wise probes of one or more checkpoints (the paper's visual-quality measure).

    Freeze each checkpoint; for every LLM layer and teacher train a resampler probe to predict the
    teacher's cached target from that layer's hidden states; score = mean per-image cosine on held-out
    images. Writes a table (probe.csv / probe.json) and a plot (probe.png, distilled layers circled).
    Rerunning resumes: layers already scored are kept."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from olavlm.trainer.probe import ProbeConfig, print_scores, run_probe

    config = ProbeConfig(layers=_ints(layers), teachers=tuple(filter(None, teachers.split(","))), steps=steps,
                         batch_size=batch_size, lr=lr, width=width, heldout_percent=heldout_percent, seed=seed,
                         num_workers=num_workers, seeds=seeds, prompt=prompt, image_aspect_ratio=image_aspect_ratio)
    with user_errors(), Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn()) as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, step: int, total: int, loss: float) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(f"probe {name}", total=total, loss=loss)
            bar.update(tasks[name], completed=step, loss=loss)

        rows = run_probe([checkpoint, *compare], data=data, cache=cache, out=str(out), config=config,
                         device=device, progress=progress)
    names = sorted({r["checkpoint"] for r in rows}, key=[r["checkpoint"] for r in rows].index)
    print_scores(rows, compare=(names[0], names[1]) if len(names) > 1 else None)
    typer.echo(f"wrote {out}/probe.csv, {out}/probe.json, {out}/probe.png")


def register(groups: Groups) -> None:
    groups.root.command("probe")(probe)
