"""DataLoader workers read disjoint units; the loader state keeps a position per worker (trainer/data/loader_state.py).

Guarantees tested here: each worker reads only its own units (each sample once per epoch, not
once per worker); a resume with the same number of workers continues with exactly the next
batch; a resume with another number of workers or another world size neither repeats nor loses a
sample of any epoch it touched.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

from olavlm.schemas.config import DataConfig
from olavlm.schemas.errors import ConfigError
from olavlm.trainer.data import source
from olavlm.trainer.data.loader import build_loader
from olavlm.trainer.data.loader_state import rank_state
from olavlm.trainer.data.source import Piece, Unit, WorkerPlan, cut_for_workers, redeal, remaining, shards_of
from tests._trainer_data import make_cache, make_corpus, tiny_text_setup

# More workers than this machine's cores is the point of some tests (the processes only read tiny tars).
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


@pytest.fixture(scope="module")
def setup():
    return tiny_text_setup()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """3 shards x 6 samples, batch 4: with 2 workers, worker 0 reads 12 samples an epoch, worker 1 six."""
    d = tmp_path_factory.mktemp("workers")
    samples = make_corpus(d / "corpus", shards=3, per_shard=6)
    make_cache(d / "cache", samples)
    return d, sorted(samples)


def loader(setup, d, *, workers=0, state=None, rank=0, world=1, **overrides):
    tokenizer, layout, transform = setup
    cfg = DataConfig(
        **{**dict(data=str(d / "corpus"), batch_size=4, num_workers=workers, shuffle_block=4), **overrides}
    )
    return build_loader(
        cfg, tokenizer=tokenizer, layout=layout, transform=transform, state=state, rank=rank, world=world
    )


def take(ldr, n):
    return list(itertools.islice(iter(ldr), n))


def seen(batches) -> Counter:
    """How often each (epoch, key) was handed out."""
    return Counter((state["epoch"], key) for batch, state in batches for key in batch["keys"])


def assert_each_key_once(counts: Counter, keys, epochs) -> None:
    for epoch in epochs:
        got = {key: n for (e, key), n in counts.items() if e == epoch}
        assert got == dict.fromkeys(keys, 1), f"epoch {epoch}: {got}"


# -- who reads what --------------------------------------------------------------------------
def test_sub_units_partition_their_unit(corpus):
    shards = shards_of(str(corpus[0] / "corpus"))
    units = [Unit(shards[0], 1, 2), Unit(shards[1], 0, 2)]
    cut = cut_for_workers(units, 5)  # 2 units, 5 workers: each unit in 3
    assert len(cut) == 6 and all(u.parts == 6 for u in cut)
    for unit in units:
        mine = {i for i in range(36) if i % unit.parts == unit.part}
        subs = [{i for i in range(36) if i % u.parts == u.part} for u in cut if u.shard == unit.shard]
        assert len(subs) == 3 and set().union(*subs) == mine and sum(map(len, subs)) == len(mine)
    assert cut_for_workers(units, 2) == units  # enough units: no cut


@pytest.mark.parametrize("workers,reads_per_sample", [(3, 1), (4, 2)])
def test_each_worker_reads_only_its_units(setup, corpus, monkeypatch, workers, reads_per_sample):
    """Each worker's stream, run in this process as that worker: samples read from the tars, per worker.

    3 shards for 3 workers: every sample is read once an epoch; for 4 workers each shard is cut in
    two sub-units and each is read by one worker: twice (the documented cost of the cut).
    """
    d, keys = corpus
    reads: Counter = Counter()
    opened: dict[int, set] = {}
    real = source.iter_samples
    current = {}

    def counting(url, storage_options=None):
        opened.setdefault(current["worker"], set()).add(url)
        for item in real(url, storage_options):
            reads[current["worker"]] += 1
            yield item

    monkeypatch.setattr(source, "iter_samples", counting)
    stream = loader(setup, d, workers=workers).stream
    got: Counter = Counter()
    read_in_epoch_0: Counter = Counter()
    opened_in_epoch_0: dict[int, set] = {}
    for worker in range(workers):
        current["worker"] = worker
        info = type("Info", (), {"id": worker, "num_workers": workers})()
        monkeypatch.setattr("olavlm.trainer.data.loader.get_worker_info", lambda info=info: info)
        for batch in stream:
            epoch = batch["_position"][0]
            if epoch > 0:
                break
            got.update(batch.get("keys", []))
            read_in_epoch_0[worker] = reads[worker]  # the last batch of the epoch comes after its last read
            opened_in_epoch_0[worker] = set(opened[worker])
    assert got == dict.fromkeys(keys, 1)
    assert sum(read_in_epoch_0.values()) == reads_per_sample * len(
        keys
    )  # the old loader: workers x len(keys)
    units = [stream.deal(w, workers)(0) for w in range(workers)]
    for worker in range(workers):
        assert opened_in_epoch_0[worker] == {u.shard.url for u in units[worker]}


def test_batches_come_round_robin_from_the_workers(setup, corpus):
    d, keys = corpus
    one = [b["keys"] for b, _ in take(loader(setup, d), 10)]
    assert one == [b["keys"] for b, _ in take(loader(setup, d, workers=1), 10)]  # num_workers 0 = one worker
    assert one == [b["keys"] for b, _ in take(loader(setup, d), 10)]
    assert one != [b["keys"] for b, _ in take(loader(setup, d, seed=1), 10)]
    ldr = loader(setup, d, workers=2)
    batches = take(ldr, 12)
    deal = [ldr.stream.deal(w, 2) for w in range(2)]
    per_worker = [batches[0::2], batches[1::2]]  # the DataLoader asks worker 0, 1, 0, 1, ...
    for worker, mine in enumerate(per_worker):
        for batch, state in mine:
            shards = {u.shard.name for u in deal[worker](state["epoch"])}
            assert {f"train-{int(k[1]):03d}" for k in batch["keys"]} <= shards
    # worker 0 has 12 samples an epoch (3 batches), worker 1 six (2): worker 1 runs ahead into epoch 1
    assert [s["epoch"] for _, s in per_worker[1][:3]] == [0, 0, 1]
    assert_each_key_once(seen(batches), keys, [0])
    assert [s["batch"] for _, s in batches] == list(range(1, 13))
    done = [s["epochs_done"] for _, s in batches]
    assert done == sorted(done) and done[0] == 0
    first = done.index(1)  # from this batch on, epoch 0 is complete: a loop that wants one epoch stops here
    assert_each_key_once(seen(batches[: first + 1]), keys, [0])


# -- resume ---------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [2, 4])
def test_resume_with_the_same_workers_is_exact(setup, corpus, workers):
    """4 workers on 3 shards: sub-units; the checkpoint is taken while workers have prefetched more."""
    d = corpus[0]
    n, k = 5, 7
    full = take(loader(setup, d, workers=workers), n + k)
    state = json.loads(json.dumps(full[n - 1][1]))
    assert len(state["workers"]) == workers and state["next_worker"] == n % workers
    resumed = take(loader(setup, d, workers=workers, state=state), k)
    assert [b["keys"] for b, _ in full[n:]] == [b["keys"] for b, _ in resumed]
    assert [s["workers"] for _, s in full[n:]] == [s["workers"] for _, s in resumed]


@pytest.mark.parametrize("before,after,n", [(2, 3, 6), (3, 2, 5), (2, 0, 3), (0, 2, 7), (4, 1, 6)])
def test_resume_with_other_workers_neither_repeats_nor_loses(setup, corpus, before, after, n):
    """Keys handed out before the checkpoint + after the resume: each key of epochs 0 and 1 once."""
    d, keys = corpus
    first = take(loader(setup, d, workers=before), n)
    state = json.loads(json.dumps(first[-1][1]))
    rest = take(loader(setup, d, workers=after, state=state), 16)
    assert_each_key_once(seen(first) + seen(rest), keys, [0, 1])
    assert len(rest[-1][1]["workers"]) == max(1, after)


def test_a_state_without_worker_positions_is_refused(setup, corpus):
    d, _ = corpus
    with pytest.raises(ConfigError, match="this loader state has no 'workers'"):
        take(loader(setup, d, state={"epoch": 0, "batch": 2, "skipped": {}}), 1)


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (2, 4), (1, 3)])
def test_rank_state_at_another_world_size(setup, corpus, old_world, new_world):
    """Every rank of the new world takes its share of what all saved ranks had left (4 ranks: another unit cut)."""
    d, keys = corpus
    before = [take(loader(setup, d, rank=r, world=old_world, workers=0), 2 + r) for r in range(old_world)]
    saved = [json.loads(json.dumps(b[-1][1])) for b in before]
    counts = sum((seen(b) for b in before), Counter())
    for rank in range(new_world):
        state = rank_state(saved, rank, new_world, other_world=True)
        counts += seen(take(loader(setup, d, rank=rank, world=new_world, state=state), 12))
    assert_each_key_once(counts, keys, [0])
    assert rank_state(saved, 0, old_world) == saved[0]
    with pytest.raises(ConfigError, match=f"written by {old_world} ranks, this run has {new_world}"):
        rank_state(saved, 0, new_world)  # without other_world=True: the strict default


def test_rank_state_gives_the_skipped_total_to_rank_0():
    saved = [
        {"epoch": 0, "batch": 1, "skipped": {"read": 2}, "workers": []},
        {"epoch": 1, "batch": 3, "skipped": {"read": 1, "too_long": 1}, "workers": []},
    ]
    states = [rank_state(saved, r, 3, other_world=True) for r in range(3)]
    assert [s["skipped"] for s in states] == [{"read": 3, "too_long": 1}, {}, {}]
    assert all(s["ranks"] == saved and s["epoch"] == 0 for s in states)


def test_redeal_keeps_offsets_and_covers_lagging_epochs(corpus):
    shards = shards_of(str(corpus[0] / "corpus"))
    u = [Unit(s) for s in shards]
    ahead = (WorkerPlan((Piece(1, u[0], 3),), 2), lambda e: [u[0]])
    behind = (WorkerPlan((Piece(0, u[1], 2), Piece(0, u[2])), 1), lambda e: [u[1], u[2]])
    left, next_epoch = remaining([ahead, behind])
    assert next_epoch == 2
    assert left == {
        0: [Piece(0, u[1], 2), Piece(0, u[2])],
        1: [Piece(1, u[0], 3), Piece(1, u[1]), Piece(1, u[2])],
    }
    plans = [redeal(left, next_epoch, w, 2) for w in range(2)]
    assert sum(len(plan.pending) for plan in plans) == 5  # each piece once, offsets kept
    assert {p for plan in plans for p in plan.pending} == {p for ps in left.values() for p in ps}
    assert all(plan.next_epoch == 2 for plan in plans)


@pytest.mark.timeout(120)
def test_a_worker_without_samples_does_not_stall(setup, tmp_path):
    """1 shard of 2 samples, 3 workers: 3 sub-units, one empty; the others' batches still come, each key once."""
    make_corpus(tmp_path / "corpus", shards=1, per_shard=2)
    batches = take(loader(setup, tmp_path, workers=3, batch_size=1), 6)
    assert_each_key_once(seen(batches), ["s0-0", "s0-1"], [0, 1])


def test_a_state_of_another_rank_or_corpus_is_refused(setup, corpus):
    d = corpus[0]
    _, state = take(loader(setup, d, rank=1, world=2), 1)[0]
    with pytest.raises(ConfigError, match="rank 1 of 2.*rank_state"):
        loader(setup, d, rank=0, world=2, state=state)
    state["workers"][0]["pending"] = [[0, "gone-000", 0, 1, 0]]
    with pytest.raises(ConfigError, match="'gone-000'"):
        loader(setup, d, rank=1, world=2, state=state)


@pytest.mark.timeout(120)
def test_an_epoch_with_nothing_usable_stops_with_two_workers(setup, tmp_path):
    from olavlm.schemas.corpus import CorpusError, TarShardWriter

    (tmp_path / "corpus").mkdir()
    for shard in range(2):
        with TarShardWriter(str(tmp_path / "corpus" / f"train-{shard:03d}.tar")) as writer:
            for i in range(3):
                writer.write(f"s{shard}-{i}", {"txt": b"no json"})
    with pytest.raises(CorpusError, match="a whole epoch .* yielded no usable sample") as err:
        take(loader(setup, tmp_path, workers=2, on_missing="skip"), 1)
    assert "'bad_json'" in str(err.value)
