"""Training metrics: one record per logged step, fanned out to sinks behind one small interface.

`Metrics` is what the loop sees: `log(record, terms)` and `close()`. It drives the progress display
(a tqdm bar on a terminal, plain lines every `log_every` steps otherwise) and hands each record to
its sinks: `JsonlSink` (OUT/metrics.jsonl, always), `TensorBoardSink` and `WandbSink` (run id kept in
OUT/wandb-id.txt, so a resume continues the run), imported only when enabled. Design choice: a sink
is anything with `write(step, scalars, record)` and `close()`: a new logger is one class and one
line in `open_sinks`. Cost: every sink sees the same scalars, and only rank 0 logs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Protocol

from olavlm.schemas.config import RunConfig, to_dict
from olavlm.schemas.extras import require

METRICS = "metrics.jsonl"
WANDB_ID = "wandb-id.txt"
RATES = ("lr", "samples_per_s", "tokens_per_s")
"""Scalars every sink gets besides the loss terms."""


class Sink(Protocol):
    def write(self, step: int, scalars: dict[str, float], record: dict) -> None:
        """One logged step: `scalars` are the loss terms and rates, `record` the full metrics line."""

    def close(self) -> None: ...


class JsonlSink:
    """OUT/metrics.jsonl: the whole record, one JSON line per logged step, flushed each time
    (a killed run keeps every line it logged)."""

    def __init__(self, out: Path) -> None:
        self.file = open(out / METRICS, "a")

    def write(self, step: int, scalars: dict[str, float], record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    """OUT/tensorboard event files, one scalar per name under `train/`."""

    def __init__(self, out: Path) -> None:
        tensorboard = require("torch.utils.tensorboard", "train.tensorboard")
        self.writer = tensorboard.SummaryWriter(str(out / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float], record: dict) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A wandb run named after OUT, with the run config; resumed runs continue it (id in OUT/wandb-id.txt)."""

    def __init__(self, out: Path, project: str, config: RunConfig) -> None:
        wandb = require("wandb", "train.wandb")
        id_file = out / WANDB_ID
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        # no `mode=`: WANDB_MODE=offline|disabled from the environment decides, as wandb documents
        self.run = wandb.init(
            project=project, name=out.name, dir=str(out), id=run_id, resume="allow", config=to_dict(config)
        )

    def write(self, step: int, scalars: dict[str, float], record: dict) -> None:
        self.run.log({f"train/{name}": value for name, value in scalars.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(config: RunConfig, out: Path) -> list[Sink]:
    """The sinks `config.train` asks for; metrics.jsonl first and always. Opened sinks are closed
    again when a later one fails (a missing optional package), so nothing is left half-open."""
    tcfg = config.train
    openers = [lambda: JsonlSink(out)]
    if tcfg.tensorboard:
        openers.append(lambda: TensorBoardSink(out))
    if tcfg.wandb:
        openers.append(lambda: WandbSink(out, tcfg.wandb_project, config))
    sinks: list[Sink] = []
    try:
        for opener in openers:
            sinks.append(opener())
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks


class Metrics:
    """The loop's view: progress display + sinks on rank 0 (`main`); nothing on the other ranks."""

    def __init__(self, config: RunConfig, *, main: bool, step: int) -> None:
        tcfg = config.train
        self.main, self.every, self.total, self.stage = main, tcfg.log_every, tcfg.steps, tcfg.stage
        self.sinks: list[Sink] = []
        self.bar = None
        if not main:
            return
        out = Path(tcfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(config), indent=2, sort_keys=True))
        self.sinks = open_sinks(config, out)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=tcfg.steps, initial=step, desc=f"train {tcfg.stage}", unit="step", dynamic_ncols=True
            )

    def log(self, record: dict, terms: list[str]) -> None:
        if not self.main:
            return
        step = record["step"]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s']:.1f}")
        if step % self.every == 0 or step == self.total:
            if self.bar is None:  # not a terminal: plain lines
                print(
                    f"train {self.stage}: step {step}/{self.total} loss {record['loss']:.4f} "
                    f"lr {record['lr']:.3g} samples/s {record['samples_per_s']:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
            scalars = {name: record[name] for name in [*terms, *RATES]}
            for sink in self.sinks:
                sink.write(step, scalars, record)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close()
