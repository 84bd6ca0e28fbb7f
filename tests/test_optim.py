"""Optimisers: our schedule-free signed SGD equals schedulefree's wrapper around SignSGD."""

from __future__ import annotations

import pytest
import torch
from schedulefree import AdamWScheduleFree, ScheduleFreeWrapper

from dictlens.train.optim import ScheduleFreeAdam, ScheduleFreeSignSGD, SignSGD


def _run(make):
    w = torch.nn.Parameter(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)))
    opt = make([w])
    opt.train()
    g = torch.Generator().manual_seed(1)
    for step in range(20):
        for group in opt.param_groups:
            group["lr"] = 0.01 * min(1, (step + 1) / 5)  # a warm-up, so the average's weights vary
        w.grad = torch.randn(50, 8, generator=g) + w.detach()
        opt.step()
    y = w.detach().clone()
    opt.eval()
    x = w.detach().clone()
    opt.train()
    return y, x, w.detach().clone()


def test_schedule_free_signsgd_matches_the_reference_wrapper():
    ref = _run(lambda ps: ScheduleFreeWrapper(SignSGD(ps, 0.01, momentum=0.0), momentum=0.95))
    ours = _run(lambda ps: ScheduleFreeSignSGD(ps, 0.01, momentum=0.95))
    for a, b in zip(ref, ours, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[2], ours[0], rtol=1e-6, atol=1e-6)  # train() restores y


def test_signsgd_moves_each_coordinate_by_lr():
    w = torch.nn.Parameter(torch.zeros(4))
    opt = SignSGD([w], lr=0.1, momentum=0.0)
    w.grad = torch.tensor([3.0, -0.001, 0.0, -7.0])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([-0.1, 0.1, 0.0, 0.1]))


def test_in_place_changes_carry_into_the_average_like_the_wrapper():
    """Decoder renormalisation edits the parameters between steps; both must agree."""
    def run(make):
        w = torch.nn.Parameter(torch.randn(30, 6, generator=torch.Generator().manual_seed(0)))
        opt = make([w])
        opt.train()
        g = torch.Generator().manual_seed(2)
        for _ in range(15):
            w.grad = torch.randn(30, 6, generator=g)
            opt.step()
            with torch.no_grad():
                w /= w.norm(dim=1, keepdim=True)
        opt.eval()
        return w.detach().clone()

    ref = run(lambda ps: ScheduleFreeWrapper(SignSGD(ps, 0.01, momentum=0.0), momentum=0.95))
    torch.testing.assert_close(run(lambda ps: ScheduleFreeSignSGD(ps, 0.01)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_schedule_free_adam_matches_the_package(decay):
    """Same y during training, same x after eval(), with warm-up, in-place edits and decay."""
    def run(make):
        w = torch.nn.Parameter(torch.randn(30, 6, generator=torch.Generator().manual_seed(0)))
        opt = make([w])
        opt.train()
        g = torch.Generator().manual_seed(2)
        for step in range(25):
            opt.param_groups[0]["lr"] = 0.01 * min(1.0, (step + 1) / 5)
            w.grad = torch.randn(30, 6, generator=g) * (0.1 if step % 3 else 5.0)
            opt.step()
            with torch.no_grad():
                w /= w.norm(dim=1, keepdim=True)
        y = w.detach().clone()
        opt.eval()
        return y, w.detach().clone()

    ref = run(lambda ps: AdamWScheduleFree(ps, 0.01, betas=(0.9, 0.99), weight_decay=decay))
    ours = run(lambda ps: ScheduleFreeAdam(ps, 0.01, betas=(0.9, 0.99), weight_decay=decay))
    for a, b in zip(ref, ours, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
