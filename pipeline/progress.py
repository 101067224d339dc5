"""What the user sees of a precompute job: the live progress bar, and the `Summary` it returns.

The bar counts corpus samples done, through the teachers or refused for want of a usable image
(images/s and an ETA from the plan's sample counts, on stderr); the summary reports what the run committed and how busy the teachers were. Cost: a remote
corpus is not counted beforehand (a range request per tar member), so its bar has no ETA.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    shards: int
    """Corpus shards."""
    committed: int
    """(teacher, shard) pairs committed by this run."""
    skipped: int
    """(teacher, shard) pairs that were already committed."""
    samples: int
    """Target rows written by this run (all teachers)."""
    errors: int
    """Error rows recorded by this run: one per teacher for each sample a teacher did not take."""
    bytes: int
    """Bytes written by this run."""
    images: int
    """Images pushed through the teachers."""
    seconds: float
    """Wall time from the first batch to the last commit (excludes Ray start and model loading)."""
    fidelity: dict[str, float] | None = None
    """int8 only: worst shard's cosine_min and max_rel_error."""
    teacher_seconds: float = 0.0
    """Seconds the actors spent in teacher forward + encode, summed over actors."""
    actors: int = 1
    """Teacher actors of the run."""
    unusable_samples: int = 0
    """Corpus samples no teacher could take (no image, undecodable, unreadable), each counted once."""
    shards_in_flight: int = 0
    """Shards preprocessed at once (given, or `default_shards_in_flight`'s choice)."""

    @property
    def teacher_busy(self) -> float:
        """Share of the run's wall time the actors spent computing (1.0 = never waiting for input)."""
        return self.teacher_seconds / (self.seconds * self.actors) if self.seconds > 0 else 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        text = (
            f"{self.shards} shards: {self.committed} (teacher, shard) committed, {self.skipped} already done; "
            f"{self.samples} targets, {self.errors} error rows (one per teacher and sample; samples without a "
            f"usable image: {self.unusable_samples}), {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s "
            f"({self.images_per_second:.1f} images/s, teachers busy {self.teacher_busy:.0%})"
        )
        if self.fidelity:
            text += f"; int8 cosine_min {self.fidelity['cosine_min']:.5f}, max_rel_error {self.fidelity['max_rel_error']:.4f}"
        return text


def progress_bar(enabled: bool, total: int):
    """-> (a rich Progress on stderr, its task id), or (None, None) when not `enabled`."""
    if not enabled:
        return None, None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class ImagesPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed or 0:.1f} images/s")

    progress = Progress(
        TextColumn("precompute"),
        BarColumn(),
        MofNCompleteColumn(),
        ImagesPerSecond(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    return progress, progress.add_task("images", total=total or None)
