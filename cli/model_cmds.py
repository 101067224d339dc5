"""`ola export` and `ola generate`: the student after training."""

from __future__ import annotations

from pathlib import Path

import typer

from .errors import user_errors
from .groups import Groups


def export(
    checkpoint: Path = typer.Argument(
        ..., help="olavlm model, checkpoint or run folder (a run: its latest checkpoint)."
    ),
    out: Path = typer.Argument(
        ..., help="Output folder of the plain LLaVA checkpoint (replaced atomically)."
    ),
) -> None:
    """Export a plain transformers LLaVA checkpoint.

    The folder loads in plain transformers without olavlm: task tokens become added vocabulary
    with their trained embeddings, the heads are dropped, the tokenizer and LlavaProcessor are
    written beside the weights."""
    from olavlm.trainer.checkpoint import model_dir
    from olavlm.trainer.student.export import export_llava

    with user_errors():
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"checkpoint folder {checkpoint} does not exist")
        path = export_llava(model_dir(checkpoint), out)
    typer.echo(f"exported {checkpoint} -> {path}")


def generate(
    checkpoint: Path = typer.Argument(
        ..., help="olavlm model / checkpoint / run folder, or an exported LLaVA folder."
    ),
    image: Path = typer.Option(..., "--image", help="Image file (any format Pillow reads)."),
    prompt: str = typer.Option(..., "--prompt", help="The question or instruction about the image."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Most tokens to generate."),
) -> None:
    """Answer PROMPT about IMAGE greedily, with the LLM's chat template."""
    from PIL import Image

    from olavlm.trainer.checkpoint import model_dir
    from olavlm.trainer.eval.generate import generate as run

    with user_errors():
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"checkpoint folder {checkpoint} does not exist")
        if not image.is_file():
            raise FileNotFoundError(f"image {image} does not exist")
        with Image.open(image) as img:
            picture = img.convert("RGB")
        answer = run(model_dir(checkpoint), picture, prompt, max_new_tokens=max_new_tokens)
    typer.echo(answer)


def register(groups: Groups) -> None:
    """Add this module's commands to `groups`."""
    groups.root.command("export")(export)
    groups.root.command("generate")(generate)
