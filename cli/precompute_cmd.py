"""`ola precompute`: a thin wrapper, one function call.

`ola precompute` has one option per `PrecomputeConfig` field (cli/options.py), generated
when the command runs, so that `ola --help` imports neither numpy nor ray.
"""

from __future__ import annotations

import dataclasses
import json

import typer

from olavlm.schemas.errors import ConfigError

from .errors import user_errors
from .groups import Groups
from .options import config_options, lazy_command


def _parse_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        name, sep, model = item.partition("=")
        if not sep or not name or not model:
            raise ConfigError(
                f"--teacher {item!r}: expected NAME=PATH_OR_ID, e.g. depth=/models/depth-anything"
            )
        overrides[name.strip()] = model.strip()
    return overrides


def summary_dict(summary) -> dict:
    """A run's Summary as plain JSON values: its fields plus images_per_second and teacher_busy."""
    return {
        **dataclasses.asdict(summary),
        "images_per_second": summary.images_per_second,
        "teacher_busy": summary.teacher_busy,
    }


PRECOMPUTE_HELP = "Compute teacher targets for every image of CORPUS into CACHE (resumable; rerun to finish)."


def build_precompute():
    """The command, with one option per PrecomputeConfig field (imported here: it pulls in numpy and presets)."""
    from olavlm.pipeline.precompute import PrecomputeConfig

    @config_options({"": PrecomputeConfig}, skip=("corpus", "cache", "overrides"))
    def precompute_command(
        corpus: str = typer.Argument(
            ...,
            help="WebDataset tar shards: a folder, a brace pattern "
            "(shard-{000000..000099}.tar) or an fsspec URL.",
        ),
        cache: str = typer.Argument(
            ..., help="Target cache root: a local folder or an fsspec URL (s3://bucket/prefix)."
        ),
        teacher: list[str] = typer.Option(
            [],
            "--teacher",
            help="NAME=PATH_OR_ID: other weights for a preset teacher, "
            "same recipe; NAME=KIND:PATH_OR_ID adds a teacher (KIND: depth_anything, "
            "oneformer_swin, clip_image_embeds; list NAME in --teachers). Repeatable.",
        ),
        as_json: bool = typer.Option(
            False,
            "--json",
            help="Print the run's summary as one JSON object on stdout "
            "(with --dry-run: the plan's text, as without --json).",
        ),
        *,
        overrides: dict,
    ) -> None:
        """Compute teacher targets for every image of CORPUS into CACHE (resumable; rerun to finish).

        Every PrecomputeConfig field is an option; --dry-run prints the plan (shards done / to do,
        samples, bytes) and exits, loading the teachers on the CPU for their specs."""
        with user_errors():
            from olavlm.pipeline.precompute import plan_precompute, precompute
            from olavlm.schemas.cache import SpecMismatchError

            config = PrecomputeConfig(
                corpus=corpus, cache=cache, overrides=_parse_overrides(teacher), **overrides
            )
            if config.dry_run:
                typer.echo(plan_precompute(config).describe())
                return
            try:
                summary = precompute(config)
            except SpecMismatchError as exc:
                raise SpecMismatchError(
                    f"{exc} (rerun with --overwrite to replace that teacher's targets)"
                ) from None
            if as_json:
                typer.echo(json.dumps(summary_dict(summary)))
            else:
                typer.echo(summary.describe())

    return precompute_command


def register(groups: Groups) -> None:
    """Add `ola precompute`."""
    lazy_command(groups.root, "precompute", PRECOMPUTE_HELP, build_precompute)
