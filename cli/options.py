"""Command-line options generated from the config dataclasses: one typed path from field to option.

`config_options({"train": TrainConfig, ...})` adds one typer option per field: `--train.steps` and,
where the name is unique, `--steps` (a shared name like `seed` sets every section's); booleans as
`--distill/--no-distill`; a `Literal` field shows its choices (`--stage [pt|vpt|ift]`); `_` and `-`
are interchangeable. The help is the field's docstring (schemas/config_doc.py); values go through
`schemas.config.coerce`, the conversion config files get, so `--steps abc` fails naming `--steps`.
The command receives `overrides`: only the options the user typed (click's parameter source), which
is how a resumed run tells an explicit `--steps 1000` from the default.

Design choice and its cost: generated click options rather than tyro or jsonargparse, which would be
a second parser beside typer without the short unique-name aliases and without telling which values
were given. Cost: this module (a typed signature built at import time, which typer reads as any other).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Collection
from typing import Any, Literal, get_args, get_origin

import typer

from olavlm.schemas.config import coerce, field_types
from olavlm.schemas.config_doc import field_docs

from .groups import reflow_commands


def _parser(annotation: Any) -> Callable[[str], Any]:
    """A config field's type on the command line: `coerce`, whose ConfigError (a ValueError) click reports
    as "Invalid value for '--steps': expected an integer, got 'abc'"."""

    def parse(value):
        return value if not isinstance(value, str) else coerce(annotation, value)

    return parse


def _metavar(annotation: Any) -> str:
    """The value's placeholder in --help: INT, FLOAT, TEXT, a fixed choice's values ([pt|vpt|ift]), else VALUE."""
    if get_origin(annotation) is Literal:
        return "[" + "|".join(str(c) if c != "" else "''" for c in get_args(annotation)) + "]"
    return {int: "INT", float: "FLOAT", str: "TEXT"}.get(annotation, "VALUE")


@dataclasses.dataclass(frozen=True)
class _Option:
    param: str
    """Python name of the generated parameter."""
    targets: tuple[tuple[str, str], ...]
    """(section, field) pairs this option sets ('' = a flat config)."""
    parameter: inspect.Parameter


def _hyphen(name: str) -> str:
    return name.replace("_", "-")


def _generated(sections: dict[str, type], skip: Collection[str]) -> list[_Option]:
    owners: dict[str, list[str]] = {}
    for section, cls in sections.items():
        for f in dataclasses.fields(cls):
            if f.name not in skip and f"{section}.{f.name}" not in skip:
                owners.setdefault(f.name, []).append(section)
    options = []
    for name, where in owners.items():
        cls = sections[where[0]]
        annotation, doc = (
            field_types(cls)[name],
            field_docs(cls).get(name, "").replace("[", "\\["),
        )  # rich markup
        default = _default(next(f for f in dataclasses.fields(cls) if f.name == name))
        if len(where) > 1:  # one short option for the shared name, then one per section
            names = ["--" + _hyphen(name)]
            options.append(
                _option(
                    f"all__{name}",
                    names,
                    tuple((s, name) for s in where),
                    annotation,
                    f"Sets {' and '.join(f'{s}.{name}' for s in where)}.",
                    default,
                    "shared",
                )
            )
        for section in where:
            names = [f"--{section}.{_hyphen(name)}" if section else f"--{_hyphen(name)}"]
            if section and len(where) == 1:
                names.append(f"--{_hyphen(name)}")
            panel = f"{section} ({sections[section].__name__})" if section else None
            options.append(
                _option(
                    f"{section or 'cfg'}__{name}", names, ((section, name),), annotation, doc, default, panel
                )
            )
    return options


def _negated(option: str) -> str:
    """'--train.distill' -> '--train.no-distill'; '--distill' -> '--no-distill'."""
    head, dot, tail = option[2:].rpartition(".")
    return f"--{head}{dot}no-{tail}"


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _option(param: str, names: list[str], targets, annotation, doc: str, default, panel) -> _Option:
    if annotation is bool:
        decls = [f"{n}/{_negated(n)}" for n in names]
        info = typer.Option(default, *decls, help=doc, rich_help_panel=panel)
        hint = bool
    else:
        shown = ", ".join(map(str, default)) if isinstance(default, tuple) else default
        info = typer.Option(
            None,
            *names,
            help=doc,
            parser=_parser(annotation),
            show_default=str(shown) if shown not in ("", None) else repr(shown),
            rich_help_panel=panel,
            metavar=_metavar(annotation),
        )
        hint = str
    parameter = inspect.Parameter(param, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=hint)
    return _Option(param, targets, parameter)


def config_options(sections: dict[str, type], *, skip: Collection[str] = ()) -> Callable:
    """Decorator: the command gets one option per field of `sections` ({'' : Cls} for a flat config) and is
    called with `overrides={section: {field: value}}` (flat: {field: value}) holding the options given."""
    generated = _generated(sections, skip)

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "overrides"]

        @functools.wraps(fn)
        def command(_ola_context: typer.Context, **kwargs):
            ctx = _ola_context
            overrides: dict[str, dict[str, Any]] = {}
            for option in generated:  # shared names first: `--seed 1 --train.seed 2` gives train.seed 2
                value = kwargs.pop(option.param)
                if ctx.get_parameter_source(option.param).name in ("COMMANDLINE", "ENVIRONMENT"):
                    for section, name in option.targets:
                        overrides.setdefault(section, {})[name] = value
            if "" in sections:
                overrides = overrides.get("", {})
            return fn(**kwargs, overrides=overrides)

        context = inspect.Parameter(
            "_ola_context", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
        )
        parameters = [context] + own + [o.parameter for o in generated]
        command.__signature__ = signature.replace(parameters=parameters)
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        del command.__wrapped__  # typer must read the new signature, not fn's
        return command

    return decorate


CONTEXT_SETTINGS = {"token_normalize_func": lambda name: name.replace("_", "-")}
"""`--train.log_every` and `--train.log-every` are the same option (CONFIG.md names fields with `_`)."""


def lazy_command(group: typer.Typer, name: str, summary: str, build: Callable[[], Callable]) -> None:
    """Register `ola NAME` whose options come from a config class that imports heavy modules (torch, ray).

    `build()` imports the class and returns a `config_options`-decorated function; it runs only when the
    command runs or prints its --help, so `ola --help` and the other commands never import it. Cost: the
    command's own arguments are parsed by an inner click command, one level below `ola`."""

    @group.command(
        name,
        help=summary,
        add_help_option=False,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )
    def command(ctx: typer.Context) -> None:
        inner = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
        inner.command(name, context_settings=CONTEXT_SETTINGS)(build())
        reflow_commands(inner)
        typer.main.get_command(inner).main(args=ctx.args, prog_name=ctx.command_path, standalone_mode=True)
