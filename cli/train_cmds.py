"""`ola corpus from-llava`, `ola train`, `ola bench loader`, `ola bench train`.

Each command turns its options into one function call into trainer/ (or, for
`bench train`, cli/bench_train.py, which may construct teacher-like models).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer

from .errors import user_errors
from .groups import Groups


def from_llava(
    json_path: Path = typer.Argument(..., metavar="JSON", help="LLaVA training JSON (a list of entries)."),
    image_root: Path = typer.Argument(..., help="Folder the entries' `image` paths are relative to."),
    out: Path = typer.Argument(..., help="Folder for the WebDataset shards (llava-000000.tar, ...)."),
    shard_size: int = typer.Option(1000, help="Samples per shard."),
    prefix: str = typer.Option("llava", help="Shard file name prefix."),
) -> None:
    """Convert LLaVA's JSON format into WebDataset shards (image bytes as on disk + `json`).

    Entries with a missing image or malformed fields are reported with their ids
    (also in OUT/from_llava_report.json) and skipped; keys are stable across reruns."""
    from olavlm.trainer.from_llava import REPORT, convert_llava

    with user_errors():
        report = convert_llava(str(json_path), str(image_root), str(out), shard_size=shard_size, prefix=prefix)
    for problem in report.problems[:20]:
        typer.secho(f"skipped entry {problem['index']} (id {problem['id']!r}): {problem['reason']}",
                    fg=typer.colors.YELLOW, err=True)
    if len(report.problems) > 20:
        typer.secho(f"... {len(report.problems) - 20} more in {out / REPORT}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"wrote {report.samples} samples ({report.text_only} text-only) in {len(report.shards)} shards "
               f"to {out}; {len(report.problems)} entries skipped (see {out / REPORT})")


# -- ola train: config file + options mapped onto the config dataclasses by field name -----------------
SECTIONS = ("model", "data", "train")


def _fields():
    from olavlm.schemas.config import RunConfig

    return {section: {f.name: f for f in dataclasses.fields(RunConfig.__dataclass_fields__[section].default_factory)}
            for section in SECTIONS}


def _convert(name: str, annotation: str, raw: str | None):
    if annotation == "bool":
        if raw is None:
            return True
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name}: expected true/false, got {raw!r}")
    if raw is None:
        raise ValueError(f"--{name} needs a value")
    if annotation == "int":
        return int(raw)
    if annotation == "float":
        return float(raw)
    if annotation.startswith("tuple"):
        return tuple(x.strip() for x in raw.split(",") if x.strip())
    if annotation.startswith("dict"):
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise ValueError(f"--{name}: expected a JSON object, got {raw!r}")
        return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    return raw


def parse_overrides(args: list[str]) -> dict[str, dict]:
    """`--section.field VALUE`, `--field VALUE` (when the name is unique), `--flag` / `--no-flag` for bools
    -> {section: {field: value}}. Unknown or ambiguous names are errors that list the choices."""
    fields = _fields()
    out: dict[str, dict] = {s: {} for s in SECTIONS}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument {token!r} (options are --<section>.<field> VALUE or --<field> VALUE)")
        name, _, inline = token[2:].partition("=")
        name = name.replace("-", "_")
        negate = False
        section, _, field = name.rpartition(".")
        candidates = [section] if section else [s for s in SECTIONS if field in fields[s]]
        if not section and not candidates and field.startswith("no_"):
            field, negate = field[3:], True
            candidates = [s for s in SECTIONS if field in fields[s] and str(fields[s][field].type) == "bool"]
        elif section and field.startswith("no_") and field not in fields.get(section, {}):
            field, negate = field[3:], True
        if section and section not in fields:
            raise ValueError(f"--{name}: unknown section {section!r} (one of {SECTIONS})")
        candidates = [s for s in candidates if field in fields[s]]
        if not candidates:
            known = sorted({f for s in SECTIONS for f in fields[s]})
            raise ValueError(f"unknown option --{name.replace('_', '-')} (fields: {', '.join(known)})")
        if len(candidates) > 1:
            raise ValueError(f"--{field} is ambiguous: use " + " or ".join(f"--{s}.{field}" for s in candidates))
        section = candidates[0]
        annotation = str(fields[section][field].type)
        if annotation == "bool":
            raw = inline or None
            if raw is None and i + 1 < len(args) and args[i + 1].lower() in ("true", "false", "1", "0", "yes", "no"):
                raw, i = args[i + 1], i + 1
            value = _convert(name, annotation, raw)
            value = (not value) if negate else value
        else:
            if inline:
                raw = inline
            elif i + 1 < len(args):
                raw, i = args[i + 1], i + 1
            else:
                raw = None
            value = _convert(name, annotation, raw)
        out[section][field] = value
        i += 1
    return out


def load_config(path: Path | None, args: list[str]):
    """RunConfig from an optional TOML/YAML file, then the command-line overrides on top."""
    from olavlm.schemas.config import RunConfig, from_dict

    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        elif str(path).endswith(".toml"):
            import tomllib

            data = tomllib.loads(text)
        elif str(path).endswith(".json"):
            data = json.loads(text)
        else:
            raise ValueError(f"{path}: config files are .toml, .yaml/.yml or .json")
    config = from_dict(RunConfig, data)
    for section, values in parse_overrides(args).items():
        if values:
            config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)})
    return config


TRAIN_HELP = """Train the student against cached targets (one call of olavlm.trainer.train.train).

Every config field is an option: --SECTION.FIELD VALUE, or --FIELD VALUE when the name is unique;
booleans as --FLAG / --no-FLAG (docs/CONFIG.md lists them all).

Demo: ola train --data CORPUS --cache CACHE --stage pt --preset tiny --steps 20 --out runs/demo

Common: --stage pt|vpt|ift, --no-distill (the NTP-only baseline), --init-from PT_RUN (IFT),
--resume RUN_OR_CHECKPOINT, --lr, --grad-accum, --batch-size, --num-workers, --max-length,
--on-missing skip, --fsdp, --tensorboard, --gradient-checkpointing.
Several processes or GPUs: torchrun --nproc-per-node N -m olavlm.cli.app train ...
"""


def train_command(
    ctx: typer.Context,
    config: Path = typer.Option(None, "--config", help="TOML or YAML file with model, data and train sections."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the effective config as JSON and exit."),
) -> None:
    from olavlm.schemas.config import to_dict

    with user_errors():
        run_config = load_config(config, list(ctx.args))
        if print_config:
            typer.echo(json.dumps(to_dict(run_config), indent=2))
            return
        from olavlm.trainer.train import NonFiniteLossError, train

        try:
            summary = train(run_config)
        except NonFiniteLossError as exc:
            raise ValueError(str(exc)) from None
    if summary["history"]:
        last = summary["history"][-1]
        terms = {k: round(v, 4) for k, v in last.items() if isinstance(v, float) and k not in ("lr", "eta_s")}
        typer.echo(f"step {summary['step']}: {terms}")
    typer.echo(f"checkpoint: {summary['checkpoint']}")


def bench_loader_command(
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
    samples: int = typer.Option(256, help="Samples in the temporary corpus and cache."),
    batch_size: int = typer.Option(16, help="Samples per batch."),
    workers: int = typer.Option(2, help="DataLoader workers for the parallel figure."),
    codec: str = typer.Option("zstd", help="Blosc compressor of the temporary cache (zstd = cache default, lz4)."),
) -> None:
    """Data loader throughput per CPU core.

    Samples/s per CPU core through the whole data path (tar read, JPEG decode, tokenize, cache join,
    collate) with full-size paper targets (576x1024 + 576x1536 + 1x1024, float16). Target: >= 200."""
    from olavlm.trainer.bench_loader import bench_loader

    with user_errors():
        result = bench_loader(samples=samples, batch_size=batch_size, workers=workers, codec=codec)
    _report(result, as_json)


def bench_train_command(
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
    steps: int = typer.Option(8, help="Timed steps per variant."),
    batch_size: int = typer.Option(4, help="Samples per step."),
    workers: int = typer.Option(4, help="DataLoader workers (capped at cores - 1)."),
    online_steps: int = typer.Option(1, help="Steps with online teachers (0 = skip; slow on CPU)."),
) -> None:
    """Training step: cached-target loader vs in-memory batches vs online teachers.

    Step time with the cached-target loader / on the same batches pre-collated in memory (target <= 1.05),
    and beside them the same student with paper-size teachers run online inside the step."""
    from .bench_train import bench_train

    with user_errors():
        result = bench_train(steps=steps, batch_size=batch_size, workers=workers, online_steps=online_steps)
    _report(result, as_json)


def _report(result: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result))
        return
    for key, value in result.items():
        typer.echo(f"{key:40s} {value}")


def register(groups: Groups) -> None:
    groups.corpus.command("from-llava")(from_llava)
    groups.root.command("train", help=TRAIN_HELP, context_settings={
        "allow_extra_args": True, "ignore_unknown_options": True})(train_command)
    groups.bench.command("loader")(bench_loader_command)
    groups.bench.command("train")(bench_train_command)
