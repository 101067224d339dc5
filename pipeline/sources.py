"""Where a teacher comes from: weights location + the recipe parameters not stored with them.

Kept free of torch so that the driver and the CPU preprocessing tasks can name
teachers without paying torch's import (seconds per Ray worker process).
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("depth_anything", "oneformer_swin", "clip_image_embeds")


@dataclass(frozen=True, kw_only=True)
class TeacherSource:
    """Where a teacher's weights come from and the recipe parameters not stored with them."""

    name: str
    """Task name and cache folder ('depth', 'seg', 'gen', ...)."""
    kind: str
    """Extraction recipe: one of KINDS."""
    model: str
    """Hub id or local folder, handed to `from_pretrained`."""
    subfolder: str = ""
    """Subfolder holding the weights ('image_encoder' for the unCLIP checkpoint)."""
    revision: str = ""
    """Hub revision: a commit sha for the paper preset (presets.PAPER_REVISIONS); empty = the default branch.
    `--teacher NAME=PATH_OR_ID` clears it: other weights, their own identity (the weights hash)."""
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
