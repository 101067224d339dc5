"""`ola bench gpu`: the GPU figures (full-size teachers, pipeline, levers, training step); a smoke test on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .errors import user_errors
from .groups import Groups


def bench_gpu_command(
    as_json: bool = typer.Option(
        False, "--json", help="Print the figures as one JSON object (the table goes to stderr)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Also write the JSON here, rewritten after every section."
    ),
    smoke: bool | None = typer.Option(
        None, "--smoke/--no-smoke", help="Tiny teachers, few images, tiny student [default: on without CUDA]."
    ),
    images: int | None = typer.Option(
        None, "--images", help="Images in the benchmark corpus [default: 1024; smoke 8]."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Images per teacher forward [default: 64; smoke 4]."
    ),
    shard_size: int | None = typer.Option(
        None, "--shard-size", help="Images per corpus shard [default: 128; smoke 4]."
    ),
    dtypes: str | None = typer.Option(
        None,
        "--dtypes",
        help="Teacher compute dtypes, comma-separated [default: float16,bfloat16 on CUDA, float32 on CPU].",
    ),
    storage_dtype: str = typer.Option(
        "float16", "--storage-dtype", help="Cache storage dtype of the pipeline jobs."
    ),
    per_teacher: bool | None = typer.Option(
        None,
        "--per-teacher/--no-per-teacher",
        help="One pipeline job per teacher too, at the first dtype [default: on; smoke off].",
    ),
    shards_in_flight: int | None = typer.Option(
        None, "--shards-in-flight", help="Pipeline shards preprocessed at once [default: precompute's]."
    ),
    channels_last: bool = typer.Option(
        True, "--channels-last/--no-channels-last", help="Lever row: channels-last."
    ),
    sdpa: bool = typer.Option(True, "--sdpa/--no-sdpa", help="Lever rows: attention eager vs sdpa."),
    compile: bool | None = typer.Option(
        None,
        "--compile/--no-compile",
        help="Lever row: torch.compile of the repeated blocks [default: on; smoke off].",
    ),
    gpu_preprocess: bool = typer.Option(
        True, "--gpu-preprocess/--no-gpu-preprocess", help="Lever row: resize and crop on the device."
    ),
    seg_images: int | None = typer.Option(
        None, "--seg-images", help="Seg section: images per lever row (0 skips the section) [default: 512]."
    ),
    seg_batch_sizes: str | None = typer.Option(
        None, "--seg-batch-sizes", help="Seg section: extra batch sizes, comma-separated [default: 32,128]."
    ),
    seg_compile_modes: str | None = typer.Option(
        None,
        "--seg-compile-modes",
        help="Seg section: torch.compile modes, one row each [default: default,reduce-overhead].",
    ),
    pipeline_overlap: bool = typer.Option(
        True,
        "--pipeline-overlap/--no-pipeline-overlap",
        help="Pipeline: a three-teacher job with --actor-concurrency 2 at the first dtype.",
    ),
    pipeline_compile: str = typer.Option(
        "off",
        "--pipeline-compile",
        help="Pipeline jobs: the actors' torch.compile mode (precompute --compile).",
    ),
    cuda_tests: Path | None = typer.Option(
        None, "--cuda-tests", help="JUnit XML of `make test-gpu`: its counts go into the JSON's summary."
    ),
    train: bool = typer.Option(True, "--train/--no-train", help="The training-step section."),
    train_steps: int | None = typer.Option(
        None, "--train-steps", help="Timed training steps [default: 20; smoke 2]."
    ),
    train_batch_size: int | None = typer.Option(
        None, "--train-batch-size", help="Samples per step [default: 16; smoke 2]."
    ),
    online_steps: int | None = typer.Option(
        None, "--online-steps", help="Steps with online teachers (0 skips them)."
    ),
    sections: str | None = typer.Option(
        None, "--sections", help="Comma-separated subset of teachers,inputs,bare,levers,seg,pipeline,train."
    ),
    teachers_dir: Path | None = typer.Option(
        None,
        "--teachers-dir",
        help="Where the full-size random teachers are saved once "
        "[default: $OLAVLM_TEACHERS_DIR or ~/.cache/olavlm/teachers].",
    ),
) -> None:
    """GPU figures: paper-size teachers through precompute (fp16, bf16), levers, training step; smoke test on CPU."""
    with user_errors():
        from olavlm.bench.gpu import format_table, gpu_bench_config, run_gpu_bench
        from olavlm.schemas.errors import ConfigError

        def split(text: str | None) -> tuple[str, ...] | None:
            return tuple(v.strip() for v in text.split(",") if v.strip()) if text else None

        def ints(text: str | None) -> tuple[int, ...] | None:
            try:
                return tuple(int(v) for v in split(text) or ()) if text is not None else None
            except ValueError:
                raise ConfigError(f"--seg-batch-sizes {text!r}: give integers, comma-separated") from None

        config = gpu_bench_config(
            smoke=smoke,
            images=images,
            batch_size=batch_size,
            shard_size=shard_size,
            compute_dtypes=split(dtypes),
            storage_dtype=storage_dtype,
            per_teacher=per_teacher,
            shards_in_flight=shards_in_flight,
            channels_last=channels_last,
            sdpa=sdpa,
            compile=compile,
            gpu_preprocess=gpu_preprocess,
            seg_images=seg_images,
            seg_batch_sizes=ints(seg_batch_sizes),
            seg_compile_modes=split(seg_compile_modes),
            pipeline_overlap=pipeline_overlap,
            pipeline_compile=pipeline_compile,
            cuda_tests=str(cuda_tests) if cuda_tests else None,
            train=train,
            train_steps=train_steps,
            train_batch_size=train_batch_size,
            online_steps=online_steps,
            sections=split(sections),
            teachers_dir=str(teachers_dir) if teachers_dir else None,
        )
    # outside user_errors: a failure on the GPU machine must keep its traceback
    result = run_gpu_bench(config, out=str(out) if out else None)
    table = format_table(result)
    if as_json:
        typer.echo(table, err=True)
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(table)


def register(groups: Groups) -> None:
    """Add `ola bench gpu`."""
    groups.bench.command("gpu")(bench_gpu_command)
