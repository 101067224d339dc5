"""docs/CONFIG.md, generated from the config dataclasses' field docstrings.

Field docs live as string literals under each field (PEP 257 attribute
docstrings), which Python drops at runtime, so this reads the source with
`ast`. A test regenerates the page and compares it with docs/CONFIG.md, so the
reference cannot drift from the code. Run `python -m olavlm.schemas.config_doc > docs/CONFIG.md`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect

from . import config as config_module

SECTIONS = (("ModelConfig", "model"), ("DataConfig", "data"), ("TrainConfig", "train"))


def field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def _type(cls: type, field: dataclasses.Field) -> str:
    """The annotation as written; a fixed choice (`Literal`) as its values, e.g. `'pt' | 'vpt' | 'ift'`."""
    choices = config_module.literal_choices(cls).get(field.name)
    text = " | ".join(repr(c) for c in choices) if choices is not None else str(field.type)
    return text.replace("|", "\\|")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    return f"`{value!r}`"


def config_reference() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `schemas/config.py` by `python -m olavlm.schemas.config_doc` (a test checks it is current).",
        "`ola train --config run.toml` reads a file (TOML, YAML or JSON) with the sections below; every field is also",
        "an option of `ola train` (`--<section>.<field> VALUE`, e.g. `--train.lr 2e-5`, or `--lr 2e-5` where the name",
        "is unique; `--seed` sets both seeds). Files and options go through one typed conversion, and the effective",
        "config is saved as `config.json` in every checkpoint.",
        "",
    ]
    for cls_name, section in SECTIONS:
        cls = getattr(config_module, cls_name)
        docs = field_docs(cls)
        lines += [
            f"## `[{section}]` ({cls_name})",
            "",
            " ".join((cls.__doc__ or "").split()),
            "",
            "| field | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for field in dataclasses.fields(cls):
            lines.append(
                f"| `{field.name}` | `{_type(cls, field)}` | {_default(field)} | {docs.get(field.name, '')} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference(), end="")
