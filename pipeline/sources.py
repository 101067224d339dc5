"""How the pipeline names a teacher: the cache spec's `TeacherOrigin` (name, kind, weights) plus the
recipe parameters that are not stored with the weights.

Kept free of torch so that the driver and the CPU preprocessing tasks can name
teachers without paying torch's import (seconds per Ray worker process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from olavlm.schemas.errors import OlaError
from olavlm.schemas.spec import TeacherOrigin

KINDS = ("depth_anything", "oneformer_swin", "clip_image_embeds")


@dataclass(frozen=True, kw_only=True)
class TeacherSource(TeacherOrigin):
    """A teacher's origin (name, kind, weights) plus the recipe parameters not stored with the weights."""

    image_size: int = 0
    """Squash side in pixels for depth and seg (0 = the paper's 336 / 768); seg's processor then resizes
    once more to its own `size`. CLIP reads its resize and crop from its processor."""
    grid: int = 0
    """Seg only: the stage-4 map is resized to grid x grid (0 = the paper's 24)."""
    jpeg_draft: bool = False
    """Decode JPEGs at the smallest DCT scale that still covers this teacher's input (PIL `draft`):
    several times faster on large photos, but not the authors' full decode + resize, so the targets
    differ (docs/FIDELITY.md, item 7). Recorded in the spec: it changes the fingerprint."""
    device_resize: bool = False
    """The host only decodes; the teacher actor runs the recipe's resizes and crop on its device (torch,
    antialiased): the host's preprocessing cost falls to the decode, the pixels move a fraction of a grey
    level from PIL's (docs/FIDELITY.md, item 9). Recorded in the spec ("resize_on": "device")."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"teacher {self.name!r}: kind {self.kind!r} is not one of {KINDS}")


class TeacherLoadError(OlaError, OSError):
    """A teacher whose weights cannot be loaded (no hub access, unknown id or revision, gated, pickle only)."""


def unloadable(source: TeacherSource, error: Exception) -> TeacherLoadError:
    """One line: which teacher, from where, why, and what the user can do about it."""
    cause = " ".join(str(error).split()).rstrip(".") + "."
    if os.path.isdir(source.model):
        folder = os.path.join(source.model, source.subfolder)
        return TeacherLoadError(
            f"teacher {source.name!r} cannot be loaded from folder {folder}: {cause} To fix: the folder "
            "needs config.json and model.safetensors (save_pretrained's layout), or give another with "
            f"--teacher {source.name}=FOLDER."
        )
    part = f", subfolder {source.subfolder}" if source.subfolder else ""
    return TeacherLoadError(
        f"teacher {source.name!r} cannot be loaded from hub id {source.model!r} (revision "
        f"{source.revision or 'default branch'}{part}): {cause} To fix: give a folder with its weights "
        f"(--teacher {source.name}=FOLDER), or set HF_HOME to a hub cache that holds them (HF_HUB_OFFLINE=1 "
        "reads only that cache); a gated or private repository needs `huggingface-cli login` (or HF_TOKEN); "
        "check the id and revision for typos."
    )
