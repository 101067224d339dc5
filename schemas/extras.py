"""Optional packages (pyproject's extras): imported where they are used, a ConfigError naming the extra if missing.

A plain `pip install olavlm` installs what precompute, train, eval and probe need; the demo photos'
packages and the loggers are extras (`EXTRAS`: demo, s3, tensorboard, wandb), so a training machine
does not carry packages it never imports. Cost: a missing extra is found when the command reaches
it, not at install; the error names the `pip install 'olavlm[...]'` that fixes it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ConfigError

EXTRAS = {
    "skimage": ("scikit-image", "demo"),
    "sklearn": ("scikit-learn", "demo"),
    "s3fs": ("s3fs", "s3"),
    "torch.utils.tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}
"""Top-level module -> (distribution, extra that installs it)."""


def require(module: str, purpose: str) -> ModuleType:
    """`import module`, or a ConfigError: '<purpose> needs <distribution>: pip install 'olavlm[<extra>]''."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = next((name for name in EXTRAS if module == name or module.startswith(name + ".")), None)
        if top is None:
            raise
        distribution, extra = EXTRAS[top]
        raise ConfigError(
            f"{purpose} needs the `{distribution}` package: pip install 'olavlm[{extra}]'"
        ) from exc
