"""Losses: masking, step-wide normalisers, and 2-process (gloo) equality with the single-process loss and gradients."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from olavlm.trainer.student.losses import (
    embedding_loss,
    gather_targets,
    info_nce,
    label_count,
    next_token_loss,
)

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


V, L = 11, 6
# NTP: rank 0 holds 2 sequences with many labels, rank 1 one sequence with a single label.
NTP_SPLIT = (2, 1)


def _ntp_problem():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(sum(NTP_SPLIT), L, IN, generator=g)
    labels = torch.randint(0, V, (sum(NTP_SPLIT), L), generator=g)
    labels[:, 0] = -100
    labels[2, :-1] = -100  # one label token only
    weight = torch.randn(V, IN, generator=g)
    return h, labels, weight


def _ntp_loss_and_grad(h, labels, weight, **norm):
    weight = weight.clone().requires_grad_(True)
    loss = next_token_loss(h @ weight.T, labels, **norm)
    loss.backward()
    return loss.detach(), weight.grad


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, target, weight, valid = _problem()
        lo = sum(SPLIT[:rank])
        rows = slice(lo, lo + SPLIT[rank])
        loss, gw, gs = _loss_and_grads(x[rows], target[rows], valid[rows], weight, torch.tensor(2.0))
        # NTP normalised by the global label count (all-reduced once, as the loop does).
        h, labels, wv = _ntp_problem()
        lo = sum(NTP_SPLIT[:rank])
        ntp_rows = slice(lo, lo + NTP_SPLIT[rank])
        tokens = label_count(labels[ntp_rows]).float()
        dist.all_reduce(tokens)
        ntp, gv = _ntp_loss_and_grad(h[ntp_rows], labels[ntp_rows], wv, tokens=tokens, world_size=world)
        # What DDP does: average losses (for logging) and gradients over ranks.
        for t in (loss, gw, gs, ntp, gv):
            dist.all_reduce(t)
            t /= world
        if rank == 0:
            with open(out, "w") as f:
                json.dump(
                    {
                        "loss": loss.item(),
                        "gw": gw.flatten().tolist(),
                        "gs": gs.item(),
                        "ntp": ntp.item(),
                        "gv": gv.flatten().tolist(),
                    },
                    f,
                )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two(worker, *args, seconds: float = 120) -> None:
    """worker(rank, 2, port, *args) in 2 processes (gloo on a free port); fails the test after `seconds`."""
    ctx = mp.spawn(worker, args=(2, _free_port(), *args), nprocs=2, join=False)
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"gloo workers did not finish in {seconds} s")


def test_two_process_info_nce_equals_single_process(tmp_path):
    out = str(tmp_path / "rank0.json")
    spawn_two(_worker, out)
    got = json.loads(open(out).read())

    x, target, weight, valid = _problem()
    loss, gw, gs = _loss_and_grads(x, target, valid, weight, torch.tensor(2.0))
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(torch.tensor(got["gw"]).view_as(gw), gw, rtol=1e-4, atol=1e-6)
    assert got["gs"] == pytest.approx(gs.item(), rel=1e-4)

    h, labels, wv = _ntp_problem()
    ntp, gv = _ntp_loss_and_grad(h, labels, wv)  # the mean over all label tokens of the global batch
    assert got["ntp"] == pytest.approx(ntp.item(), rel=1e-5)
    torch.testing.assert_close(torch.tensor(got["gv"]).view_as(gv), gv, rtol=1e-4, atol=1e-6)
    # Teeth: the average of the per-rank means weights rank 1's single token like rank 0's many.
    per_rank = [next_token_loss(h[i:j] @ wv.T, labels[i:j]) for i, j in ((0, 2), (2, 3))]
    assert abs(sum(per_rank).item() / 2 - ntp.item()) > 1e-3


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


def test_normalisers_scale_the_sum_of_this_batch():
    logits = torch.randn(2, 4, 11)
    labels = torch.tensor([[-100, 3, 4, -100], [-100, -100, 7, 1]])
    total = F.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    assert label_count(labels).item() == 4
    torch.testing.assert_close(
        next_token_loss(logits, labels, tokens=torch.tensor(12.0), world_size=2), total * 2 / 12
    )
    torch.testing.assert_close(next_token_loss(logits, labels, tokens=4.0), next_token_loss(logits, labels))

    x, target, weight, valid = _problem()
    pred = (x @ weight.T).view(-1, T, D)
    default = embedding_loss(pred, target, valid, torch.tensor(2.0))  # 3 valid samples
    torch.testing.assert_close(
        embedding_loss(pred, target, valid, torch.tensor(2.0), images=torch.tensor(6.0)), default * 3 / 6
    )
