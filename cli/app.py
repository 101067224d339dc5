"""`ola`: the command line of olavlm.

Each command parses its options and makes one function call into schemas/,
pipeline/ or trainer/; heavy modules (torch, ray, transformers) are imported
inside the commands so that `ola --help` stays instant. Every module here owns
its commands and adds them through `register(groups)`.
"""

from __future__ import annotations

import typer

from . import (
    bench_cmds,
    bench_fidelity_cmd,
    bench_gpu_cmd,
    bench_join_cmd,
    cache_cmds,
    corpus_cmds,
    demo_cmd,
    eval_cmd,
    model_cmds,
    precompute_cmd,
    probe_cmd,
    train_cmds,
)
from .groups import Groups, reflow_commands

app = typer.Typer(
    name="ola",
    help="OLA-VLM: cache teacher embeddings offline, train a LLaVA-style MLLM against them, probe and export it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
groups = Groups(
    root=app,
    corpus=typer.Typer(
        help="Build WebDataset corpora (demo corpus, LLaVA JSON conversion).", no_args_is_help=True
    ),
    cache=typer.Typer(help="Inspect and verify target caches.", no_args_is_help=True),
    bench=typer.Typer(help="Benchmarks whose figures go into docs/BENCHMARKS.md.", no_args_is_help=True),
)
app.add_typer(groups.corpus, name="corpus")
app.add_typer(groups.cache, name="cache")
app.add_typer(groups.bench, name="bench")
for module in (
    corpus_cmds,
    cache_cmds,
    precompute_cmd,
    train_cmds,
    probe_cmd,
    model_cmds,
    demo_cmd,
    eval_cmd,
    bench_cmds,
    bench_gpu_cmd,
    bench_fidelity_cmd,
    bench_join_cmd,
):
    module.register(groups)
reflow_commands(app, groups.corpus, groups.cache, groups.bench)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
