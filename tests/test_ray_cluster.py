"""Ray sessions of `ola precompute`: a fresh local Ray by default, a cluster started apart with `ray start`.

- Without --address the job starts its own local Ray even when RAY_ADDRESS names a dead cluster and
  `ray start` left a stale registration (the failure seen: "Failed to connect to Ray cluster at ...").
- `ray start --head` in a private temp dir, `ola precompute --address` against it, cache verified.
  Torn down by SIGTERM to the `ray start` process alone (it stops its cluster's processes in order;
  never `ray stop`: it kills every Ray of the user on the machine, other jobs' included), then SIGKILL
  to its process group and to any process left under the private temp dir.
- The multi-node refusal of a local cache path and the runtime_env hand-over, on fakes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from typer.testing import CliRunner

from olavlm.pipeline import precompute as driver
from olavlm.pipeline.precompute import PrecomputeConfig, check_cache_reachable
from olavlm.schemas.cache import TargetCache
from olavlm.schemas.errors import ConfigError
from olavlm.schemas.inspect import verify_cache
from tests._precompute_data import build_corpus, cli_command, read_cache

pytestmark = pytest.mark.timeout(180)

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    keys = build_corpus(folder, shards=2, per_shard=3)
    return folder, keys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def short_tmp():
    """A short private folder for Ray's temp dir (its unix sockets must fit in 107 bytes)."""
    path = tempfile.mkdtemp(prefix="olaray", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- unit checks on fakes -----------------------------------------------------------------------
def test_a_local_cache_is_refused_on_a_multi_node_cluster():
    one, two = {"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": True}
    dead = {"NodeID": "c", "Alive": False}
    for url in ("/data/cache", "relative/cache", "file:///data/cache"):
        check_cache_reachable(url, [one])  # one node: fine
        check_cache_reachable(url, [one, dead])  # a dead node does not count
        with pytest.raises(ConfigError, match=r"2 nodes.*s3://"):
            check_cache_reachable(url, [one, two, dead])
    check_cache_reachable("s3://bucket/cache", [one, two])
    check_cache_reachable("gs://bucket/cache", [one, two])


class ProbeRay:
    """Runs a remote function at once, in `cwd` (where a cluster's worker would resolve relative paths)."""

    def __init__(self, cwd):
        self.cwd = cwd

    def remote(self, fn):
        ray = self

        class Remote:
            def options(self, **_):
                return self

            def remote(self, *args):
                before = os.getcwd()
                os.chdir(ray.cwd)
                try:
                    return fn(*args)
                finally:
                    os.chdir(before)

        return Remote()

    def get(self, value):
        return value


def test_cache_writability_is_checked_from_the_cluster(tmp_path, monkeypatch):
    """The driver and a task must reach the same cache: a relative path seen from a worker's folder is
    another disk to it; a cache under a file is not writable. Both fail with the cache named."""
    (tmp_path / "driver").mkdir()
    (tmp_path / "worker").mkdir()
    monkeypatch.chdir(tmp_path / "driver")
    ray = ProbeRay(tmp_path / "worker")
    with pytest.raises(
        ConfigError, match=r"cache 'cache' is not writable from the Ray cluster.*does not see"
    ):
        driver.check_cache_writable(ray, "cache", {})
    driver.check_cache_writable(ray, str(tmp_path / "driver" / "cache"), {})
    assert os.listdir(tmp_path / "driver" / "cache") == []  # the probe files are gone
    assert os.listdir(tmp_path / "worker") == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not writable from this machine"):
        driver.check_cache_writable(ray, str(tmp_path / "file" / "cache"), {})


class FakeRay:
    def __init__(self):
        self.calls = []

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        self.calls.append(kwargs)

    def shutdown(self):
        self.calls.append("shutdown")


def test_ray_session_starts_a_fresh_local_ray_and_passes_the_runtime_env(monkeypatch):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    env = {"env_vars": {"HF_HUB_OFFLINE": "1"}, "pip": ["einops"], "working_dir": "."}
    with driver.ray_session(None, env):
        pass
    with driver.ray_session("10.0.0.1:6379"):
        pass
    assert fake.calls[0]["address"] == "local" and fake.calls[0]["runtime_env"] == env
    assert fake.calls[2]["address"] == "10.0.0.1:6379" and fake.calls[2]["runtime_env"] is None
    assert fake.calls[1] == fake.calls[3] == "shutdown"


def test_runtime_env_and_retry_options_parse_and_validate(tmp_path):
    from olavlm.cli.precompute_cmd import build_precompute  # noqa: F401  (the options exist)

    config = PrecomputeConfig(corpus="c", cache="k", runtime_env={"env_vars": {"A": "1"}}, max_restarts=0)
    assert config.runtime_env == {"env_vars": {"A": "1"}} and config.max_retries == 3
    with pytest.raises(ConfigError, match="max-retries"):
        PrecomputeConfig(corpus="c", cache="k", max_retries=-1)


# -- real Ray ----------------------------------------------------------------------------------
def test_without_address_a_fresh_local_ray_whatever_is_registered(corpus, tmp_path, short_tmp, monkeypatch):
    """A dead RAY_ADDRESS and a stale `ray start` registration are ignored; --json prints the summary."""
    import ray

    if ray.is_initialized():
        pytest.skip("this process already runs a Ray (the job would reuse it)")
    stale = _free_port()  # nothing listens there
    with open(os.path.join(short_tmp, "ray_current_cluster"), "w") as f:
        f.write(f"127.0.0.1:{stale}")
    monkeypatch.setenv(
        "RAY_TMPDIR", short_tmp
    )  # where Ray looks for the registration (and keeps its session)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{stale}")
    for name, value in RAY_ENV.items():
        monkeypatch.setenv(name, value)
    from olavlm.cli.app import app

    cache = tmp_path / "cache"
    result = CliRunner().invoke(
        app,
        [
            "precompute",
            str(corpus[0]),
            str(cache),
            "--preset",
            "tiny",
            "--teachers",
            "gen",
            "--batch-size",
            "4",
            "--no-progress",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["committed"] == 2 and summary["samples"] == len(corpus[1]) and summary["errors"] == 0
    assert summary["images_per_second"] > 0 and not ray.is_initialized()
    assert sorted(read_cache(cache, "gen")) == sorted(corpus[1])


@contextlib.contextmanager
def ray_head(temp_dir: str, timeout: float = 60.0):
    """`ray start --head --block` in its own process group; yields the address; kills only what it started."""
    port = _free_port()
    env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": temp_dir}
    env.pop("RAY_ADDRESS", None)
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    head = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:  # the GCS is up when `ray status` answers
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited {head.returncode}: {open(log.name).read()[-2000:]}")
            probe = subprocess.run(
                [ray_cli, "status", f"--address={address}"], env=env, capture_output=True, timeout=30
            )
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"ray start --head: no cluster at {address} after {timeout} s")
            time.sleep(1)
        yield address, env
    finally:
        _stop_head(head, temp_dir)
        log.close()


def _pids_under(temp_dir: str) -> list[int]:
    """Processes whose command line names `temp_dir` (the raylet, GCS and workers of that cluster)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if temp_dir.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM `ray start` alone, then SIGKILL what is left of its process group or still runs under temp_dir.

    Not SIGTERM to the whole group: the GCS would stop together with the processes that report to it
    (raylet, autoscaler monitor), and these may then wait for it for many seconds before they exit;
    `ray start` alone stops its processes in order."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    for _ in range(2):
        left = _pids_under(temp_dir)
        if not left:
            break
        for pid in left:  # by pid: processes of the cluster this test started, nothing else
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    if head.poll() is None:
        head.kill()
        head.wait(timeout=10)


@pytest.mark.slow
def test_precompute_against_a_cluster_started_with_ray_start(corpus, tmp_path, short_tmp):
    """`ray start --head` apart from the job, `ola precompute --address` joins it, the cache verifies.

    Corpus and cache are given relative to the driver's folder: the cluster's tasks run elsewhere, so
    the driver makes them absolute before the job starts. One teacher: joining is what is tested."""
    cache = tmp_path / "cache"
    with ray_head(short_tmp) as (address, env):
        runtime_env = json.dumps({"env_vars": {"OLA_TEST_RUNTIME_ENV": "1"}})
        proc = subprocess.run(
            cli_command(
                "precompute",
                os.path.relpath(corpus[0], tmp_path),
                "cache",
                "--preset",
                "tiny",
                "--teachers",
                "gen",
                "--batch-size",
                "4",
                "--address",
                address,
                "--runtime-env",
                runtime_env,
                "--max-restarts",
                "1",
                "--no-progress",
                "--json",
            ),
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["committed"] == 2 and summary["samples"] == len(corpus[1]) and summary["errors"] == 0
    report = verify_cache(TargetCache(str(cache)), str(corpus[0]))
    assert report.ok, report.problems
    assert TargetCache(str(cache)).teachers() == ["gen"]
    assert sorted(read_cache(cache, "gen")) == sorted(corpus[1])
