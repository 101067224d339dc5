"""`ola bench torture`: many seeded SIGKILLs of plain and sharded training and of precompute into a local
S3-compatible server, each resumed and compared (bench/kill.py); the counts go to docs/BENCHMARKS.md.
Design choice: the data, the student and the object store are built here, so that the command needs
nothing but the dev extras (moto). Cost: every trial launches fresh interpreters: minutes per run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from olavlm.bench.kill import SHAPES, torture_precompute, torture_train

PARTS = ("plain", "sharded", "precompute")


def write_corpus(folder: Path, shards: int, per_shard: int) -> dict[str, tuple[str, bytes]]:
    """Tar shards of noise JPEGs with a caption conversation (keys s{shard}-{i}); {key: (shard, jpeg)}."""
    import io

    import numpy as np
    from PIL import Image

    from olavlm.schemas.corpus import TarShardWriter

    folder.mkdir(parents=True, exist_ok=True)
    rng, samples = np.random.default_rng(0), {}
    for s in range(shards):
        with TarShardWriter(str(folder / f"train-{s:03d}.tar")) as writer:
            for i in range(per_shard):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
                turns = [("human", "<image>\nWhat is in the image?"), ("gpt", f"A small dog, number {i}.")]
                text = json.dumps({"conversations": [{"from": f, "value": v} for f, v in turns]}).encode()
                writer.write(f"s{s}-{i}", {"jpg": buffer.getvalue(), "json": text})
                samples[f"s{s}-{i}"] = (f"train-{s:03d}", buffer.getvalue())
    return samples


def train_setup(root: Path, steps: int):
    """A corpus, a synthetic cache and the tiny student under `root`; the RunConfig the training torture
    runs (PT, a save every step, keep_last 2, frozen weights saved: the plain or the sharded layout)."""
    from olavlm.schemas import quant
    from olavlm.schemas.cache import TargetCache
    from olavlm.schemas.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from olavlm.schemas.corpus import sha256_hex
    from olavlm.schemas.spec import TeacherSpec
    from olavlm.schemas.synthetic import feature_like
    from olavlm.trainer.student.presets import TINY_HEADS, build_tiny_student

    samples = write_corpus(root / "corpus", shards=2, per_shard=8)
    cache = TargetCache(str(root / "cache"))
    for seed, (task, shape) in enumerate(SHAPES.items()):
        cache.register(TeacherSpec(name=task, kind="synthetic", model="synthetic", shape=shape))
        for shard in sorted({s for s, _ in samples.values()}):
            keys = sorted(k for k, (s, _) in samples.items() if s == shard)
            values, scale = quant.encode(feature_like(len(keys), *shape, seed=seed), "float16")
            cache.write_shard(task, shard, keys, [sha256_hex(samples[k][1]) for k in keys], values, scale)
    student = build_tiny_student(root / "student", seed=0)
    llm = Path(student.llm) / "config.json"  # attention dropout: the RNG state must survive every kill
    llm.write_text(json.dumps({**json.loads(llm.read_text()), "attention_dropout": 0.3}))
    return RunConfig(
        model=ModelConfig(vision_model=student.vision_model, llm=student.llm, **TINY_HEADS),
        data=DataConfig(data=str(root / "corpus"), cache=str(root / "cache"), batch_size=2, max_length=256),
        train=TrainConfig(stage="pt", steps=steps, save_every=1, log_every=1, keep_last=2, save_frozen=True),
    )


def object_store() -> tuple[dict, object]:
    """A local S3-compatible server (moto, 127.0.0.1) with a bucket "olavlm": (fsspec options, its stop).
    The options keep s3fs's instance cache: fresh instances per call leave unclosed aiohttp sessions."""
    import logging

    from olavlm.schemas.errors import ConfigError

    try:
        import boto3
        import moto.server
    except ImportError:
        raise ConfigError("the precompute part needs moto: pip install 'moto[server]'") from None
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto.server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # a free port
    server.start()
    port = server.get_host_and_port()[1]
    client = {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}
    s3 = boto3.client("s3", aws_access_key_id="test", aws_secret_access_key="test", **client)
    s3.create_bucket(Bucket="olavlm")
    options = {"key": "test", "secret": "test", "client_kwargs": client}
    return options, server.stop


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def bench_torture(trials: int = 10, parts: tuple = PARTS, seed: int = 0, root: str | None = None) -> dict:
    """`trials` kills per part (plain and sharded training, precompute into S3); the counts and whether every
    resume was exact."""
    from olavlm.schemas.errors import ConfigError

    if trials < 1 or not parts or set(parts) - set(PARTS):
        raise ConfigError(f"--trials {trials} (>= 1), --parts {','.join(parts)} (some of {','.join(PARTS)})")
    result: dict = {"trials": trials, "load_average_before": _load()}
    with tempfile.TemporaryDirectory(prefix="ola-torture-", dir=root) as tmp:
        tmp = Path(tmp)
        if {"plain", "sharded"} & set(parts):  # a launch runs 1-3 steps before its kill
            config = train_setup(tmp / "data", steps=3 * trials + 3)
        for part, processes in (("plain", 1), ("sharded", 2)):
            if part in parts:
                train = dataclasses.replace(config.train, fsdp=processes > 1)
                run = dataclasses.replace(config, train=train)
                result[part] = torture_train(run, tmp / part, processes=processes, kills=trials, seed=seed)
        if "precompute" in parts:
            import ray

            options, stop = object_store()
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster: no token warning
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
            try:
                write_corpus(tmp / "corpus", shards=2 * trials + 2, per_shard=4)
                address = ray.get_runtime_context().gcs_address
                where = {"address": address, "workdir": tmp / "precompute", "options": options}
                corpus, url = str(tmp / "corpus"), "s3://olavlm/torture"
                result["precompute"] = torture_precompute(corpus, url, kills=trials, seed=seed, **where)
            finally:
                ray.shutdown()
                stop()
    done = [result[p] for p in parts]
    result.update(kills=sum(r["kills"] for r in done), kills_in_save=sum(r["kills_in_save"] for r in done))
    result.update(all_exact=all(r["exact"] for r in done), load_average_after=_load())
    return result
