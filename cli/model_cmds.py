"""`ola export`, `ola generate` and `ola bench heads`: the student after (and besides) training."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .errors import user_errors
from .groups import Groups


def export(
    checkpoint: Path = typer.Argument(..., help="olavlm model, checkpoint or run folder (a run: its latest checkpoint)."),
    out: Path = typer.Argument(..., help="Output folder of the plain LLaVA checkpoint (replaced atomically)."),
) -> None:
    """Export a plain transformers LLaVA checkpoint.

    Task tokens as added vocabulary with their trained
    embeddings, heads dropped, tokenizer + LlavaProcessor) that loads without olavlm."""
    from olavlm.trainer.checkpoint import model_dir
    from olavlm.trainer.export import export_llava

    with user_errors():
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"checkpoint folder {checkpoint} does not exist")
        path = export_llava(model_dir(checkpoint), out)
    typer.echo(f"exported {checkpoint} -> {path}")


def generate(
    checkpoint: Path = typer.Argument(..., help="olavlm model / checkpoint / run folder, or an exported LLaVA folder."),
    image: Path = typer.Option(..., "--image", help="Image file (any format Pillow reads)."),
    prompt: str = typer.Option(..., "--prompt", help="The question or instruction about the image."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Most tokens to generate."),
) -> None:
    """Answer PROMPT about IMAGE greedily, with the LLM's chat template."""
    from PIL import Image

    from olavlm.trainer.checkpoint import model_dir
    from olavlm.trainer.generate import generate as run

    with user_errors():
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"checkpoint folder {checkpoint} does not exist")
        if not image.is_file():
            raise FileNotFoundError(f"image {image} does not exist")
        with Image.open(image) as img:
            picture = img.convert("RGB")
        answer = run(model_dir(checkpoint), picture, prompt, max_new_tokens=max_new_tokens)
    typer.echo(answer)


def bench_heads(
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    sizes: str = typer.Option("tiny,mid", help="Comma-separated sizes for the time overhead (tiny, mid); '' = none."),
    repeats: int = typer.Option(3, min=1, help="Timed steps per variant (the minimum is reported)."),
) -> None:
    """Size and cost of the distillation heads.

    Parameters of heads + task tokens for the paper's students (meta device), and the fwd+bwd time
    overhead of the heads relative to the bare student on this CPU."""
    from olavlm.trainer.bench_heads import SIZES, head_overhead, paper_param_counts

    chosen = [s for s in sizes.split(",") if s]
    unknown = [s for s in chosen if s not in SIZES]
    if unknown:
        raise typer.BadParameter(f"unknown sizes {unknown}; known: {sorted(SIZES)}")
    report = {"params": paper_param_counts(), "overhead": [head_overhead(s, repeats=repeats) for s in chosen]}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for name, c in report["params"].items():
        typer.echo(
            f"{name}: student {c['student'] / 1e9:.3f}B, heads {c['heads'] / 1e6:.1f}M "
            f"({len(c['per_head'])} heads), task tokens {c['task_tokens'] / 1e3:.1f}K, "
            f"added {100 * c['added_fraction']:.2f}%, PT-trainable {c['pt_trainable'] / 1e6:.1f}M; "
            f"per {c['seq_len']}-token sample heads {c['heads_gmac_per_sample']:.0f} GMAC vs student "
            f"{c['student_gmac_per_sample']:.0f} GMAC ({100 * c['heads_compute_fraction']:.1f}%)"
        )
    for o in report["overhead"]:
        typer.echo(
            f"{o['size']}: batch {o['batch']} x {o['seq_len']} tokens, LLM {o['llm_hidden']}x{o['llm_layers']}, "
            f"{o['heads']} heads of width {o['head_width']}: bare {o['bare_s'] * 1e3:.0f} ms, "
            f"with heads {o['with_heads_s'] * 1e3:.0f} ms (+{100 * o['overhead']:.0f}%)"
        )


def register(groups: Groups) -> None:
    """Add this module's commands to `groups`."""
    groups.root.command("export")(export)
    groups.root.command("generate")(generate)
    groups.bench.command("heads")(bench_heads)
