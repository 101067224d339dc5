"""`ola probe`: layer-wise probes of one or more checkpoints on the same split and budget.

One option per `ProbeConfig` field (cli/options.py), generated when the command runs:
trainer/eval/probe.py imports torch, which `ola --help` must not.
"""

from __future__ import annotations

from pathlib import Path

import typer

from .cache_cmds import STORAGE_OPTIONS_HELP, parse_storage_options
from .errors import user_errors
from .groups import Groups
from .options import config_options, lazy_command

PROBE_HELP = "Layer-wise probes of one or more checkpoints (the paper's visual-quality measure)."


def build_probe():
    """The command, with one option per ProbeConfig field (imported here: trainer/eval/probe.py imports torch)."""
    from olavlm.trainer.eval.probe import ProbeConfig

    @config_options({"": ProbeConfig})
    def probe(
        checkpoint: str = typer.Argument(
            ..., help="Model, checkpoint or run folder (a run: its latest checkpoint)."
        ),
        data: str = typer.Option(
            ..., "--data", help="WebDataset image-text shards to probe on (folder, pattern, URL)."
        ),
        cache: str = typer.Option(
            ..., "--cache", help="Target cache holding the teachers' targets for --data."
        ),
        out: Path = typer.Option(..., "--out", help="Folder for probe.json, probe.csv and probe.png."),
        compare: list[str] = typer.Option(
            [],
            "--compare",
            help="Another checkpoint to probe identically (repeatable), e.g. the NTP-only baseline.",
        ),
        device: str | None = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
        storage_options: str | None = typer.Option(None, "--storage-options", help=STORAGE_OPTIONS_HELP),
        *,
        overrides: dict,
    ) -> None:
        """Layer-wise probes of one or more checkpoints (the paper's visual-quality measure).

        Freeze each checkpoint; for every LLM layer and teacher train a resampler probe to predict the
        teacher's cached target from that layer's hidden states; score = mean per-image cosine on held-out
        images. Writes a table (probe.csv / probe.json) and a plot (probe.png, distilled layers circled).
        Rerunning resumes: layers already scored are kept. Every ProbeConfig field is an option
        (--layers '8,20' or '1-32'; --teachers depth,seg)."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        from olavlm.trainer.eval.probe import print_scores, run_probe

        with (
            user_errors(),
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TimeRemainingColumn(),
            ) as bar,
        ):
            config = ProbeConfig(**overrides)  # its checks raise ConfigError: one red line
            tasks: dict[str, int] = {}

            def progress(name: str, step: int, total: int, loss: float) -> None:
                if name not in tasks:
                    tasks[name] = bar.add_task(f"probe {name}", total=total, loss=loss)
                bar.update(tasks[name], completed=step, loss=loss)

            rows = run_probe(
                [checkpoint, *compare],
                data=data,
                cache=cache,
                out=str(out),
                config=config,
                device=device,
                progress=progress,
                storage_options=parse_storage_options(storage_options),
            )
        names = sorted({r["checkpoint"] for r in rows}, key=[r["checkpoint"] for r in rows].index)
        print_scores(rows, compare=(names[0], names[1]) if len(names) > 1 else None)
        typer.echo(f"wrote {out}/probe.csv, {out}/probe.json, {out}/probe.png")

    return probe


def register(groups: Groups) -> None:
    lazy_command(groups.root, "probe", PROBE_HELP, build_probe)
