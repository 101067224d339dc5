"""Optional packages (pyproject's extras): imported where they are used, a ConfigError naming the extra if missing.

A plain `pip install olavlm` installs what precompute, train, eval and probe need; packages that
only the demo photos or one logger need are extras, so a training machine does not carry scipy,
scikit-image or a wandb client it never imports:

    demo         scikit-image, scikit-learn   the bundled photos of `ola corpus demo`, `ola demo`, `ola bench`
    s3           s3fs                         s3:// corpora and caches
    tensorboard  tensorboard                  TrainConfig.tensorboard
    wandb        wandb                        TrainConfig.wandb

matplotlib is not an extra: `ola probe` always writes probe.png and `ola cache show` is a PNG.
Cost: a missing extra is found when the command reaches it, not at install; the error says which
`pip install 'olavlm[...]'` fixes it. tests/test_packaging.py checks `EXTRAS` against pyproject.toml.
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
