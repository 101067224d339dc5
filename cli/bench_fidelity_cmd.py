"""`ola bench fidelity`: the multi-seed OLA vs baseline probe experiment of docs/FIDELITY.md.

One option per `FidelityConfig` field (cli/options.py), generated when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .groups import Groups
from .options import config_options, lazy_command

HELP = "OLA vs NTP-only baseline probe scores over training seeds and probe widths (docs/FIDELITY.md)."


def build_fidelity():
    from olavlm.bench.fidelity import FidelityConfig

    @config_options({"": FidelityConfig})
    def fidelity(
        out: Path = typer.Option(
            Path("out/fidelity"), "--out", help="Working folder (corpus, cache, runs, probes, fidelity.json)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
        *,
        overrides: dict,
    ) -> None:
        """OLA vs NTP-only baseline probe scores over training seeds and probe widths; resumable.

        Builds the demo corpus and the tiny teachers' cache, trains PT with distillation and the baseline
        once per training seed from the same initial weights, probes every layer of both at each probe
        width (`ola probe`'s configuration otherwise) with several probe seeds, and reports OLA - baseline
        per width and teacher, paired by training seed (mean, std, t), beside the probe noise floor.
        A rerun reuses every finished run and probe."""
        import transformers

        from olavlm.bench.fidelity import describe, run_fidelity

        transformers.utils.logging.set_verbosity_error()
        result = run_fidelity(out, FidelityConfig(**overrides), log=lambda m: typer.echo(m, err=True))
        typer.echo(json.dumps(result, indent=2) if as_json else describe(result))

    return fidelity


def register(groups: Groups) -> None:
    lazy_command(groups.bench, "fidelity", HELP, build_fidelity)
