"""SIGKILL `ola train` and `ola precompute` at seeded random moments, resume, compare with an uninterrupted run.

Training: a run saving every step with `keep_last`, as one process (plain layout) or two under torchrun
(FSDP2 on gloo: sharded layout), is killed with SIGKILL of its whole process tree 1-3 steps into each
launch (every other kill inside that step's save, once its staging folder appears) and resumed from
OUT until it finishes. After each kill, LATEST and the checkpoint a resume would take equal the
uninterrupted run's checkpoint of that step (tensors, trainer.json) and are no older than before; at
the end every metrics.jsonl record, steps logged twice included, equals the uninterrupted run's.
Precompute: a job writing to local disk or an object store joins a running Ray and is killed and rerun
alike (every other kill, after the launch's first commit, as soon as another of its shard writes shows
in the store); committed shards are always whole and the final cache equals an uninterrupted run's bit for bit.
`ola bench torture` (bench/torture.py) runs these with many kills, tests/test_kill_resume.py with few.
Design choice: every launch is a fresh interpreter, so that a kill takes real processes down.
Cost: each launch pays the torch + transformers imports, which dominate a trial on a CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

NOT_COMPARED = ("samples_per_s", "tokens_per_s", "eta_s")
"""metrics.jsonl fields that measure time, not the run."""
SHAPES = {"gen": (1, 24), "depth": (64, 32), "seg": (64, 48)}
"""Target shapes the tiny student's heads fit (64 image tokens)."""
TEACHERS = ("depth", "gen")
"""The precompute job's (tiny) teachers."""
POLL_S, S3_POLL_S = 0.005, 0.1  # seconds between looks: at OUT or for a shard write; while timing commits


# -- processes ----------------------------------------------------------------------------------------
def kill_tree(process: subprocess.Popen) -> list[int]:
    """SIGKILL `process` and every descendant; the pids still alive afterwards ([] = all gone). torchrun
    starts its workers in sessions of their own, so one killpg would leave them training."""
    tree, groups = [process.pid, *_descendants(process.pid)], set()
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    for group in sorted(groups, key=lambda g: g == process.pid):  # the root's group last
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    process.wait(timeout=60)
    time.sleep(0.2)  # orphans are reaped by init
    return [pid for pid in tree[1:] if _stat(pid)[:1] not in ([], ["Z"], ["X"])]


def _stat(pid) -> list[str]:
    """/proc/PID/stat's fields after the command name: state, parent, ... ([] once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if fields := _stat(pid):
            children.setdefault(int(fields[1]), []).append(int(pid))
    found = list(children.get(root, []))
    for pid in found:  # the loop also visits what it appends: every generation
        found += children.get(pid, [])
    return found


def _launch(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _ended(process: subprocess.Popen, log: Path) -> bool:
    """Whether the launch ended (by itself: it must have succeeded)."""
    if process.poll() is not None and process.returncode != 0:
        raise RuntimeError(f"{process.args[:6]} exited {process.returncode}: {log.read_text()[-3000:]}")
    return process.poll() is not None


def _wait_until(process: subprocess.Popen, ready, log: Path, poll: float = POLL_S, timeout=900) -> bool:
    """Poll until `ready()` every `poll` seconds; False if the launch ended first."""
    start = time.monotonic()
    while not ready():
        if _ended(process, log):
            return False
        if time.monotonic() - start > timeout:
            kill_tree(process)
            raise TimeoutError(f"{process.args[:6]}: still waiting after {timeout} s")
        time.sleep(poll)
    return True


def _kill(process: subprocess.Popen, log: Path, problems: list[str]) -> bool:
    """Kill the launch's tree if it still runs; whether it did."""
    if _ended(process, log):
        return False
    survivors = kill_tree(process)
    problems += [f"processes {survivors} of the killed launch survived"] if survivors else []
    return True


# -- training -----------------------------------------------------------------------------------------
def _in_save(out: Path) -> set[str]:
    """Names under OUT/checkpoints that exist only while a save runs (a staging folder, LATEST's temporary
    file, a folder being pruned or replaced): a kill that leaves a new one landed inside a save."""
    try:
        return {p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")}
    except FileNotFoundError:
        return set()


def _staging(out: Path) -> set[str]:
    return {n for n in _in_save(out) if n.startswith(".step-") and ".tmp-" in n}


def _lines(path: Path) -> int:  # metrics.jsonl records so far
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _same_checkpoint(got: Path, expected: Path) -> list[str]:
    """How checkpoint `got` differs from `expected` (the uninterrupted run's of its step): file set, every
    tensor, trainer.json but its time (config.json names the run's OUT)."""
    import torch
    from safetensors.torch import load_file

    files = sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file())
    if files != sorted(str(p.relative_to(expected)) for p in expected.rglob("*") if p.is_file()):
        return [f"{got}: files {files} differ from {expected}'s"]
    problems = []
    for name in (f for f in files if f.endswith(".safetensors")):
        a, b = load_file(got / name), load_file(expected / name)
        if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
            problems.append(f"{got / name}: tensors differ from the uninterrupted run's")
    a, b = (json.loads((folder / "trainer.json").read_text()) for folder in (got, expected))
    if {**a, "time": 0} != {**b, "time": 0}:
        problems.append(f"{got}/trainer.json differs from the uninterrupted run's")
    return problems


def _check_checkpoints(out: Path, reference: Path, last_step: int) -> tuple[int, list[str]]:
    """(the step a resume would take, problems): LATEST names a complete checkpoint, and the one a resume
    finds is complete and not older than `last_step` (what an earlier kill left)."""
    from olavlm.trainer import checkpoint

    base, problems = out / checkpoint.CHECKPOINTS, []
    if (base / checkpoint.LATEST).exists():
        named = base / (base / checkpoint.LATEST).read_text().strip()
        if not (named / checkpoint.TRAINER).exists():
            return last_step, [f"LATEST names {named.name}, which is not a complete checkpoint"]
        problems += _same_checkpoint(named, reference / checkpoint.CHECKPOINTS / named.name)
    try:
        found = checkpoint.find(out)
    except FileNotFoundError:
        return 0, problems + ([f"no checkpoint left after step {last_step} was saved"] if last_step else [])
    step = json.loads((found / checkpoint.TRAINER).read_text())["step"]
    if step < last_step:
        problems.append(f"a resume would start from step {step}, but step {last_step} was saved")
    return step, problems + _same_checkpoint(found, reference / checkpoint.CHECKPOINTS / found.name)


def _compare_metrics(out: Path, reference: Path, steps: int) -> tuple[int, list[str]]:
    """(records compared, problems): every record of `out` equals the reference's of its step, exactly."""
    from olavlm.trainer.train import read_metrics

    expected, got = {r["step"]: r for r in read_metrics(reference)}, read_metrics(out)
    logged = sorted({r["step"] for r in got})
    problems = [] if logged == sorted(expected) == list(range(1, steps + 1)) else [f"logged steps {logged}"]
    for record in got:
        want = expected.get(record["step"], {})
        different = [k for k in want if k not in NOT_COMPARED and record.get(k) != want[k]]
        if different:
            problems.append(f"step {record['step']}: {different} differ from the uninterrupted run's")
    return len(got), problems


def _watch_saves(process: subprocess.Popen, out: Path, log: Path) -> tuple[float, float]:
    """Run the uninterrupted launch to its end: (its seconds per step, its shortest save in seconds)."""
    began: dict[str, float] = {}
    saves, first = [], None
    while not _ended(process, log):
        now, names = time.monotonic(), _staging(out)
        first = first if first is not None or not _lines(out / "metrics.jsonl") else now
        began.update({n: now for n in names - began.keys()})
        saves += [now - began.pop(n) for n in [n for n in began if n not in names]]
        time.sleep(POLL_S)
    steps = max(1, _lines(out / "metrics.jsonl") - 1)
    return (time.monotonic() - (first or time.monotonic())) / steps, min(saves, default=0.0)


def torture_train(config, workdir: str | Path, *, processes: int = 1, kills: int = 3, seed: int = 0) -> dict:
    """Kill `ola train` of `config` (a RunConfig that saves every step, with keep_last) `kills` times and
    resume it each time; see the module docstring. The counts and the problems found ([] = none)."""
    from olavlm.schemas.config import to_dict

    (workdir := Path(workdir)).mkdir(parents=True, exist_ok=True)
    steps, started = config.train.steps, time.perf_counter()
    reference, out, log = workdir / "uninterrupted", workdir / "killed", workdir / "launches.log"
    for folder, keep in ((reference, 0), (out, config.train.keep_last)):
        train = dataclasses.replace(config.train, out=str(folder), keep_last=keep)
        text = json.dumps(to_dict(dataclasses.replace(config, train=train)))
        (workdir / f"{folder.name}.json").write_text(text)
    ola = [sys.executable, "-m", "olavlm.cli.app"]
    if processes > 1:
        ola[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]

    def launch(folder: Path, step: int) -> subprocess.Popen:
        fresh = ["--config", str(workdir / f"{folder.name}.json")]  # no checkpoint yet: start afresh
        return _launch([*ola, "train", *(fresh if not step else ["--resume", str(folder)])], log)

    step_s, save_s = _watch_saves(launch(reference, 0), reference, log)
    metrics, rng, step, problems = out / "metrics.jsonl", random.Random(seed), 0, []
    killed = in_save = resumed = 0  # kills, kills inside a save, steps that resumed launches logged
    for trial in range(kills + 1):  # the last launch runs to the end
        before, logged, process = _in_save(out), _lines(metrics), launch(out, step)
        # the kill comes after this launch's k-th logged step, 1 <= k <= 3, and leaves a step to do
        k = rng.randrange(max(1, min(3, steps - step - 2))) + 1
        if trial < kills and _wait_until(process, lambda n=logged + k: _lines(metrics) >= n, log):
            if trial % 2 == 0:  # inside that step's save, within the shortest save
                _wait_until(process, lambda seen=before: _staging(out) - seen, log)
            time.sleep(rng.random() * (save_s if trial % 2 == 0 else step_s))  # else: within the next step
        landed = trial < kills and _kill(process, log, problems)
        if not landed:
            _wait_until(process, lambda: False, log)
        killed, in_save = killed + landed, in_save + bool(landed and _in_save(out) - before)
        resumed += (_lines(metrics) - logged) if step else 0
        step, found = _check_checkpoints(out, reference, step)
        problems += [f"kill {killed}: {p}" for p in found] if landed else found
        if not landed:
            break
    records, different = _compare_metrics(out, reference, steps)
    problems += different + ([f"the run ended at step {step}, not {steps}"] if step != steps else [])
    problems += [f"killed saves' leftovers stayed: {left}"] if (left := sorted(_in_save(out))) else []
    result = {"layout": "sharded" if processes > 1 else "plain", "processes": processes, "steps": steps}
    result.update(trials=kills, kills=killed, kills_in_save=in_save, launches=trial + 2, records=records)
    result.update(resumed_records=resumed)
    result.update(shortest_save_s=round(save_s, 3), exact=not problems)
    return {**result, "problems": problems, "seconds": round(time.perf_counter() - started, 1)}


# -- precompute (local disk or an object store) --------------------------------------------------------
def read_stored(cache, teacher: str) -> dict[str, bytes]:
    """key -> its stored row's bytes (and its int8 scale's), over a TargetCache's committed shards."""
    cache.root.fs.invalidate_cache()  # listings are cached, and another process writes
    out = {}
    for shard in cache.committed_shards(teacher):
        reader = cache.open_shard(teacher, shard)
        values, scale = reader.read_stored(slice(None))
        for row, key in enumerate(reader.keys):
            out[key] = values[row].tobytes() + (b"" if scale is None else scale[row].tobytes())
    return out


def _shards(cache, teachers) -> tuple[int, set[tuple[str, ...]]]:
    """(committed shards, the shards being written: folders without commit.json, staging ones included),
    from one recursive listing: cheap enough to poll an object store every few milliseconds."""
    from olavlm.schemas.cache import COMMIT_JSON, STAGING

    root = cache.root
    root.fs.invalidate_cache()  # listings are cached, and another process writes
    try:
        files = root.fs.find(root.path)
    except FileNotFoundError:
        files = []
    folders: dict[tuple[str, ...], bool] = {}  # (teacher, shard) or (teacher, STAGING, name): committed
    for path in files:
        parts = path[len(root.path) :].strip("/").split("/")
        if parts[0] not in teachers or len(parts) < 3:
            continue
        staging = parts[1] == STAGING  # never committed, even holding commit.json: its rename commits
        if not staging and parts[1].startswith("."):  # the key index and other non-shard folders
            continue
        folder = tuple(parts[:3] if staging else parts[:2])
        folders[folder] = folders.get(folder, False) or (not staging and parts[2] == COMMIT_JSON)
    return sum(folders.values()), {folder for folder, done in folders.items() if not done}


def _same_rows(cache, reference: dict, *, whole: bool) -> list[str]:
    problems = []
    for teacher, rows in reference.items():
        stored = read_stored(cache, teacher)
        if whole and sorted(stored) != sorted(rows):
            problems.append(f"{teacher}: {len(stored)} keys, the uninterrupted run has {len(rows)}")
        bad = [k for k, v in stored.items() if rows.get(k) != v]
        problems += [f"{teacher}: {bad[:5]} differ from the uninterrupted run's"] if bad else []
    return problems


def torture_precompute(
    corpus: str, cache_url: str, *, address: str, workdir, options: dict | None = None, kills=3, seed=0
) -> dict:
    """Kill `ola precompute CORPUS CACHE_URL` (tiny teachers, joining Ray at `address`) `kills` times and
    rerun it each time; the uninterrupted run writes to CACHE_URL-uninterrupted. See the module docstring."""
    from olavlm.schemas.cache import TargetCache
    from olavlm.schemas.inspect import verify_cache

    started, options, teachers = time.perf_counter(), options or {}, TEACHERS
    log = Path(workdir) / "precompute.log"
    Path(workdir).mkdir(parents=True, exist_ok=True)
    flags = ["--preset", "tiny", "--batch-size", "4", "--teachers", ",".join(teachers), "--address", address]
    flags += ["--no-progress", *(["--storage-options", json.dumps(options)] if options else [])]

    def job(url: str) -> subprocess.Popen:
        return _launch([sys.executable, "-m", "olavlm.cli.app", "precompute", corpus, url, *flags], log)

    urls = (cache_url, cache_url + "-uninterrupted")
    cache, uninterrupted = (TargetCache(url, options or None) for url in urls)
    first, commits = job(urls[1]), []
    while not _ended(first, log):
        commits += [time.monotonic()] * (_shards(uninterrupted, teachers)[0] - len(commits))
        time.sleep(S3_POLL_S)
    gap = (commits[-1] - commits[0]) / (len(commits) - 1) if len(commits) > 1 else 0.5  # s per commit
    reference = {t: read_stored(uninterrupted, t) for t in teachers}
    rng, problems, killed, in_write, launches, at_kills = random.Random(seed), [], 0, 0, 1, []
    for trial in range(kills):
        before, left = _shards(cache, teachers)  # left: what earlier kills left half-written
        process, launches = job(cache_url), launches + 1
        if trial % 2 == 0:  # once this launch has committed a shard, as soon as it writes another

            def writing(before=before, left=left) -> bool:
                committed, being_written = _shards(cache, teachers)
                return committed > before and bool(being_written - left)

            _wait_until(process, writing, log, POLL_S)
        # else from this launch's first commit, within the next few shards' time
        elif _wait_until(process, lambda before=before: _shards(cache, teachers)[0] > before, log, S3_POLL_S):
            time.sleep(rng.random() * gap * 3)
        if not _kill(process, log, problems):
            break
        committed, being_written = _shards(cache, teachers)
        killed, in_write, at_kills = killed + 1, in_write + bool(being_written - left), [*at_kills, committed]
        problems += [f"kill {killed}: {p}" for p in _same_rows(cache, reference, whole=False)]
    else:
        _wait_until(job(cache_url), lambda: False, log)
        launches += 1
    problems += _same_rows(cache, reference, whole=True)
    report = verify_cache(TargetCache(cache_url, options or None))
    problems += [] if report.ok else [f"verify: {report.problems[:3]}"]
    left = _shards(cache, teachers)[1]
    problems += [f"uncommitted shards left after the rerun: {sorted(left)}"] if left else []
    result = {"store": cache_url.split("://")[0] if "://" in cache_url else "local", "trials": kills}
    result.update(rows=sum(map(len, reference.values())), kills=killed, kills_in_save=in_write)
    result.update(launches=launches, committed_at_kills=at_kills, exact=not problems, problems=problems)
    return {**result, "seconds": round(time.perf_counter() - started, 1)}
