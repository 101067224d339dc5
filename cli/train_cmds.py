"""`ola train`: every config field is an option; one call of olavlm.trainer.train.train."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from olavlm.schemas.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    from_dict,
    merge,
    read_config_file,
    to_dict,
)

from .errors import user_errors
from .groups import Groups
from .options import CONTEXT_SETTINGS, config_options

# -- ola train: every config field is an option (cli/options.py) --------------------------------------
SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def load_config(path: Path | None, overrides: dict[str, dict]) -> tuple[RunConfig, set[str]]:
    """RunConfig from an optional TOML/YAML/JSON file with the given options on top, both typed by
    `from_dict`; plus the names ('train.steps', ...) the user set, which a resumed run keeps."""
    data = read_config_file(path) if path is not None else {}
    merged = merge(data, overrides)
    given = {
        f"{section}.{name}"
        for section, values in merged.items()
        if isinstance(values, dict)
        for name in values
    }
    return from_dict(RunConfig, merged), given


TRAIN_HELP = """Train the student against cached targets (one call of olavlm.trainer.train.train).

Every config field is an option: --SECTION.FIELD VALUE, or --FIELD VALUE when the name is unique
(--seed sets data.seed and train.seed); booleans as --FLAG / --no-FLAG. A --config file (TOML, YAML or
JSON, docs/CONFIG.md) is read first; options override it. On --resume, the given --steps, --out,
--save-every, --log-every and --keep-last apply, and the checkpoints go to the resumed run's own folder
unless --out is given; the saved run defines the rest (an option equal to its value is accepted, so the
command that started the run can be rerun with --resume). A larger --steps on resume stretches the
learning-rate schedule over the new total: from the resumed step on, the rate is the longer cosine's
(after a finished run, it rises again).

Demo: ola train --data CORPUS --cache CACHE --stage pt --preset tiny --steps 20 --out runs/demo

Several processes or GPUs: torchrun --nproc-per-node N -m olavlm.cli.app train ...
"""


@config_options(SECTIONS)
def train_command(
    config: Path = typer.Option(
        None, "--config", help="TOML, YAML or JSON file with model, data and train sections."
    ),
    print_config: bool = typer.Option(
        False, "--print-config", help="Print the effective config as JSON and exit."
    ),
    *,
    overrides: dict[str, dict],
) -> None:
    with user_errors():
        run_config, given = load_config(config, overrides)
        if print_config:
            typer.echo(json.dumps(to_dict(run_config), indent=2))
            return
        from olavlm.trainer.train import train

        summary = train(run_config, given=given)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports for every rank
        return
    if summary["last"]:
        terms = {
            k: round(v, 4)
            for k, v in summary["last"].items()
            if isinstance(v, float) and k not in ("lr", "eta_s")
        }
        typer.echo(f"step {summary['step']}: {terms}")
    typer.echo(f"checkpoint: {summary['checkpoint']}")


def register(groups: Groups) -> None:
    groups.root.command("train", help=TRAIN_HELP, context_settings=CONTEXT_SETTINGS)(train_command)
