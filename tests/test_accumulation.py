"""Gradient accumulation and DDP see one big batch (loss normalisation), CPU only.

Every loss term is normalised by the optimizer step's global count (label tokens, images) over
all ranks and micro-batches, so `--batch-size 2 --grad-accum 4` gives the gradients of
`--batch-size 8`. The micro-batches below have very uneven label-token and image counts, where
the old per-micro-batch mean gives other gradients (asserted, so that the tests have teeth).
The InfoNCE negatives are one micro-step's global batch, so its value only matches a big batch
of that micro-step's size: the single-process tests set its weight to 0 (every other term is a
sum over items and decomposes), and the 2-process test compares micro-steps of equal global size
with the InfoNCE weight of the paper.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from olavlm.schemas.config import TrainConfig
from olavlm.trainer.parallel import Dist
from olavlm.trainer.student.build import build_student
from olavlm.trainer.train import _accumulate, _finite, _param_groups
from tests._student import SPECS, make_batch, tiny_config
from tests.test_losses import spawn_two

LONG = "A small brown dog sits on a wooden table next to a red cup and a folded newspaper in the morning sun."
# 8 samples, micro-batches of 2: label tokens per micro-batch very uneven (long, short, mixed, long),
# images per micro-batch 2, 1, 0, 2 (a micro-batch without any image).
SAMPLES = [
    ("Describe the image in detail.", LONG, True),
    ("Describe the scene.", LONG + " " + LONG, True),
    ("How many dogs?", "One.", True),
    ("Say hi.", "Hi.", False),
    ("Say yes.", "Yes.", False),
    ("Tell me a story.", LONG, False),
    ("What colour is the cup?", "Red.", True),
    ("What is on the table?", LONG, True),
]
CPU = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
RTOL, ATOL = 1e-4, 1e-6


def _model(config):

    torch.manual_seed(0)
    model = build_student(config, SPECS)
    _param_groups(model, TrainConfig(stage="pt"), distill=True)  # PT's trainable set
    return model


def _batch(model, rows, seed=0):
    """Rows of SAMPLES as one padded batch; targets and pixels drawn per sample (same in any batching)."""
    parts = [make_batch(model, [SAMPLES[i]], seed=100 + i) for i in rows]
    batch = make_batch(model, [SAMPLES[i] for i in rows], seed=seed)
    batch["pixel_values"] = torch.cat([p["pixel_values"] for p in parts])
    batch["targets"] = {t: torch.cat([p["targets"][t] for p in parts]) for t in SPECS}
    batch["keys"] = [f"s{i}" for i in rows]
    return batch


def _step(model, wrapped, micro_batches, distill=True, d=CPU):
    """One step's accumulated gradients {name: grad} and its logged terms, through the loop's own code."""
    model.zero_grad(set_to_none=True)
    sums, *_ = _accumulate(
        model,
        wrapped,
        iter([(b, {}) for b in micro_batches]),
        TrainConfig(stage="pt", grad_accum=len(micro_batches)),
        distill,
        d,
        contextlib.nullcontext(),
    )
    terms, finite = _finite(sums)
    assert finite
    grads = {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    return grads, terms


def _old_step(model, micro_batches, distill=True):
    """The wrong normalisation: each micro-batch's own mean, divided by grad_accum."""
    model.zero_grad(set_to_none=True)
    for batch in micro_batches:
        (model(batch, distill=distill)["loss"] / len(micro_batches)).backward()
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def _assert_grads_close(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=RTOL, atol=ATOL, msg=name)


def _differs(got, expected) -> bool:
    return any(not torch.allclose(got[n], expected[n], rtol=RTOL * 10, atol=ATOL * 10) for n in expected)


@pytest.fixture(scope="module")
def setup():
    model = _model(tiny_config(info_nce_weight=0.0))
    big = [_batch(model, range(8))]
    micro = [_batch(model, range(i, i + 2)) for i in range(0, 8, 2)]
    counts = [model.count_items(b) for b in micro]
    assert len({c[0] for c in counts}) == 4 and [c[1] for c in counts] == [2, 1, 0, 2]  # uneven, as meant
    return model, big, micro


def test_batch_2_accum_4_gives_the_gradients_and_terms_of_batch_8_in_pt_with_distillation(setup):
    model, big, micro = setup
    expected, big_terms = _step(model, model, big)
    got, terms = _step(model, model, micro)
    assert all(v.abs().sum() > 0 for n, v in expected.items() if not n.startswith("logit_scales"))
    _assert_grads_close(got, expected)
    assert terms.keys() == big_terms.keys() and "depth" in terms
    for name in big_terms:  # the logged loss of the step = the loss of one big batch
        assert terms[name] == pytest.approx(big_terms[name], rel=RTOL, abs=ATOL), name
    # One micro-batch, grad_accum 1, one process: exactly the plain forward (today's values).
    plain = model(big[0])
    assert all(big_terms[n] == plain[n].item() for n in big_terms)
    # Teeth: per-micro-batch means (the old normalisation) give other gradients here.
    assert _differs(_old_step(model, micro), expected)


def test_ntp_with_uneven_label_counts_is_averaged_over_the_step(setup):
    model, big, micro = setup
    expected, big_terms = _step(model, model, big, distill=False)
    got, terms = _step(model, model, micro, distill=False)
    _assert_grads_close(got, expected)
    assert terms["ntp"] == pytest.approx(big_terms["ntp"], rel=RTOL)
    old = _old_step(model, micro, distill=False)
    assert _differs(old, expected)  # the mean of per-micro-batch means is not the mean over all tokens
    old_ntp = sum(model(b, distill=False)["ntp"].item() for b in micro) / len(micro)
    assert abs(old_ntp - big_terms["ntp"]) > 1e-3 * abs(big_terms["ntp"])


def test_info_nce_runs_in_float32_under_bf16_autocast():
    from olavlm.trainer.student.losses import gather_targets, info_nce

    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 3, 5, generator=g)
    target = torch.randn(4, 3, 5, generator=g)
    valid = torch.tensor([True, True, False, True])
    gathered = gather_targets(target, valid)
    scale = torch.tensor(100.0).log()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = info_nce(pred.bfloat16(), valid, gathered, scale)
    assert under.dtype == torch.float32
    # Bit-equal to the float32 computation on the same (bf16-rounded) inputs: no bf16 matmul inside.
    assert torch.equal(under, info_nce(pred.bfloat16().float(), valid, gathered, scale))


# ---------------------------------------------------------------- 2 processes (gloo, DDP)


def _ddp_rows(rank: int) -> list[list[int]]:
    """Rank r's micro-batches: micro-step m holds samples 4m..4m+3, rank r the pair 4m+2r, 4m+2r+1."""
    return [[4 * m + 2 * rank, 4 * m + 2 * rank + 1] for m in range(2)]


def _ddp_worker(rank: int, world: int, port: int, config, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _model(config)
        wrapped = DistributedDataParallel(model, find_unused_parameters=True)
        micro = [_batch(model, rows) for rows in _ddp_rows(rank)]
        grads, terms = _step(model, wrapped, micro, d=Dist(rank, world, rank, torch.device("cpu")))
        if rank == 0:
            torch.save({"grads": grads, "terms": terms}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_process_ddp_with_accumulation_equals_one_process(tmp_path):
    """2 ranks x batch 2 x grad_accum 2 = 1 process x batch 4 x grad_accum 2 (same micro-step global
    batches, so InfoNCE at the paper's weight 0.3 is included)."""
    config = tiny_config()
    out = str(tmp_path / "rank0.pt")
    spawn_two(_ddp_worker, config, out, seconds=100)
    got = torch.load(out)

    model = _model(config)
    assert model.config.info_nce_weight == pytest.approx(0.3)
    micro = [_batch(model, range(4 * m, 4 * m + 4)) for m in range(2)]
    expected, terms = _step(model, model, micro)
    _assert_grads_close(got["grads"], expected)
    for name in terms:  # rank-averaged logged terms = the single process's
        assert got["terms"][name] == pytest.approx(terms[name], rel=RTOL, abs=ATOL), name
    json.dumps(got["terms"])  # plain floats, as metrics.jsonl writes them


# ---------------------------------------------------------------- the whole loop, from the loader


@pytest.mark.timeout(300)
def test_train_batch_2_accum_4_logs_the_step_of_batch_8(tmp_path):
    """`train()` itself: same samples in the step, same logged terms and gradient norm (clipping off)."""
    from olavlm.schemas.config import DataConfig, ModelConfig, RunConfig
    from olavlm.trainer.train import read_metrics, train
    from tests._trainer_data import make_cache, make_corpus

    samples = make_corpus(tmp_path / "corpus", shards=1, per_shard=8, text_only_every=3)
    make_cache(tmp_path / "cache", samples, shapes=SPECS)

    def step_one(batch_size, grad_accum):
        out = tmp_path / f"b{batch_size}x{grad_accum}"
        train(
            RunConfig(
                model=ModelConfig(preset="tiny", info_nce_weight=0.0),
                data=DataConfig(
                    data=str(tmp_path / "corpus"),
                    cache=str(tmp_path / "cache"),
                    batch_size=batch_size,
                    num_workers=0,
                    max_length=256,
                ),
                train=TrainConfig(
                    stage="pt",
                    steps=1,
                    out=str(out),
                    grad_accum=grad_accum,
                    grad_clip=1e9,
                    save_every=100,
                    log_every=1,
                ),
            )
        )
        return read_metrics(out)[0]

    big, accumulated = step_one(8, 1), step_one(2, 4)
    assert big["keys_sha256"] == accumulated["keys_sha256"]  # the same 8 samples, in the same order
    for name in ("loss", "ntp", "gen", "depth", "seg", "grad_norm"):
        assert accumulated[name] == pytest.approx(big[name], rel=RTOL), name
