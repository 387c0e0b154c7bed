"""The parallel engines (ilrdpo.engines): which one a launch gets, and how each deals out a
micro-batch. The engines' training itself is compared with one plain process in
tests/test_distributed.py (DDP, FSDP, ZeRO under torchrun / accelerate launch)."""

from __future__ import annotations

import pytest
import torch

from ilrdpo import engines, ranks


def world(monkeypatch, rank: int, size: int) -> None:
    monkeypatch.setattr(ranks, "rank", lambda: rank)
    monkeypatch.setattr(ranks, "world_size", lambda: size)


@pytest.mark.unit
@pytest.mark.parametrize("env,size,name", [
    ({}, 1, "plain"), ({}, 2, "ddp"),
    ({"ACCELERATE_USE_FSDP": "true"}, 2, "fsdp"), ({"ACCELERATE_USE_FSDP": "true"}, 1, "plain"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, 1, "zero"), ({"ACCELERATE_USE_DEEPSPEED": "true"}, 2, "zero"),
])
def test_the_launcher_chooses_the_engine(monkeypatch, env, size, name):
    """FSDP over one process has nothing to shard (plain); DeepSpeed runs in one process too
    (ZeRO-Offload on one GPU)."""
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    world(monkeypatch, 0, size)
    assert engines.launched_name() == name
    engine = engines.launched()
    assert type(engine) is engines.ENGINES[name] and engine.name == name
    assert engines.launched() is engine  # one object per engine and process


@pytest.mark.unit
def test_replicas_skip_a_micro_batch_without_pairs_of_their_own(monkeypatch):
    """Three pairs over two processes: positions 0 and 2 to rank 0, 1 to rank 1; one pair: rank 1
    has none and runs no pass. Shares of the step's 4 pairs; the loss weight is the share."""
    engine = engines.DataParallel()
    world(monkeypatch, 0, 2)
    assert engine.share([7, 8, 9], 4) == ([7, 9], 0.5, 0.5)
    world(monkeypatch, 1, 2)
    assert engine.share([7, 8, 9], 4) == ([8], 0.25, 0.25)
    assert engine.share([7], 4) is None


@pytest.mark.unit
@pytest.mark.parametrize("engine", [engines.FSDP(), engines.ZeRO()], ids=["FSDP", "ZeRO"])
def test_sharded_engines_run_every_micro_batch_in_lockstep(monkeypatch, engine):
    """Sharded engines average gradients over W processes: each weights its share by W, and a
    process without pairs runs a zero-weighted pass on the micro-batch's first pair, since the
    others' collectives wait for its own."""
    world(monkeypatch, 1, 2)
    assert engine.share([7, 8, 9], 4) == ([8], 0.25, 0.5)
    assert engine.share([7], 4) == ([7], 0.0, 0.0)


@pytest.mark.unit
def test_a_non_finite_loss_reaches_no_gradient_but_a_sharded_process_still_runs_its_backward():
    weight = torch.nn.Parameter(torch.ones(2))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = (weight * torch.tensor([1.0, float("nan")])).sum().reshape(1)
    engines.Engine().backward(losses, 1.0, scaler)
    assert weight.grad is None  # replicas skip it: the round stops before the step
    engines.FSDP().backward(losses, 1.0, scaler)
    assert weight.grad is not None  # the backward ran (its collectives with it); the step never comes


@pytest.mark.unit
def test_plain_step_clips_and_reports_the_norm_before_clipping():
    weight = torch.nn.Parameter(torch.zeros(2))
    weight.grad = torch.tensor([3.0, 4.0])
    optimizer = torch.optim.SGD([weight], lr=1.0)
    norm = engines.Engine().step(optimizer, torch.amp.GradScaler("cpu", enabled=False), [weight], max_grad_norm=1.0)
    assert norm == pytest.approx(5.0)
    assert weight.detach() == pytest.approx(torch.tensor([-0.6, -0.8]))  # the clipped gradient, unit norm
    assert weight.grad is None
