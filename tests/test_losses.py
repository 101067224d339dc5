"""Embedding losses: masking, and 2-process (gloo) equality with the single-process loss and gradients."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from olavlm.trainer.losses import embedding_loss, gather_targets, info_nce, next_token_loss

T, D, IN = 3, 5, 7
# Rank 0 gets 3 samples, rank 1 gets 2 (uneven last batch); samples 1 and 4 have no image.
SPLIT = (3, 2)
VALID = [True, False, True, True, False]


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SPLIT), IN, generator=g)
    target = torch.randn(sum(SPLIT), T, D, generator=g)
    weight = torch.randn(T * D, IN, generator=g) * 0.3
    return x, target, weight, torch.tensor(VALID)


def _loss_and_grads(x, target, valid, weight, scale):
    """A shared 'model' (one linear map) so that DDP-style gradient averaging applies."""
    weight = weight.clone().requires_grad_(True)
    scale = scale.clone().requires_grad_(True)
    pred = (x @ weight.T).view(-1, T, D)
    loss = embedding_loss(pred, target, valid, scale)
    loss.backward()
    return loss.detach(), weight.grad, scale.grad


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, target, weight, valid = _problem()
        lo = sum(SPLIT[:rank])
        rows = slice(lo, lo + SPLIT[rank])
        loss, gw, gs = _loss_and_grads(x[rows], target[rows], valid[rows], weight, torch.tensor(2.0))
        # What DDP does: average losses (for logging) and gradients over ranks.
        for t in (loss, gw, gs):
            dist.all_reduce(t)
            t /= world
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"loss": loss.item(), "gw": gw.flatten().tolist(), "gs": gs.item()}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_info_nce_equals_single_process(tmp_path):
    out = str(tmp_path / "rank0.json")
    ctx = mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("gloo workers did not finish in 120 s")
    got = json.loads(open(out).read())

    x, target, weight, valid = _problem()
    loss, gw, gs = _loss_and_grads(x, target, valid, weight, torch.tensor(2.0))
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(torch.tensor(got["gw"]).view_as(gw), gw, rtol=1e-4, atol=1e-6)
    assert got["gs"] == pytest.approx(gs.item(), rel=1e-4)


def test_info_nce_matches_manual_cross_entropy():
    x, target, weight, valid = _problem()
    pred = (x @ weight.T).view(-1, T, D)
    keep = valid.nonzero().flatten()
    p = F.normalize(pred[keep].flatten(1), dim=-1)
    t = F.normalize(target[keep].flatten(1), dim=-1)
    expected = F.cross_entropy(2.0 * p @ t.T, torch.arange(len(keep)))  # masked samples: no rows, no columns
    got = info_nce(pred, valid, gather_targets(target, valid), torch.tensor(2.0).log())
    torch.testing.assert_close(got, expected)


def test_logit_scale_is_clamped():
    x, target, weight, valid = _problem()
    pred = (x @ weight.T).view(-1, T, D)
    g = gather_targets(target, valid)
    big = info_nce(pred, valid, g, torch.tensor(10.0), max_scale=100.0)
    at_max = info_nce(pred, valid, g, torch.tensor(100.0).log(), max_scale=100.0)
    torch.testing.assert_close(big, at_max)


def test_all_masked_batch_gives_zero_not_nan():
    x, target, weight, _ = _problem()
    pred = (x @ weight.T).view(-1, T, D).requires_grad_(True)
    loss = embedding_loss(pred, target, torch.zeros(len(x), dtype=torch.bool), torch.tensor(2.0))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(pred.grad).all()


def test_next_token_loss_ignores_masked_labels():
    logits = torch.randn(2, 4, 11)
    labels = torch.tensor([[-100, 3, 4, -100], [-100, -100, 7, 1]])
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(next_token_loss(logits, labels), expected)

