"""The exponential moving average of G's weights (``train.ema_decay``): what validates, checkpoints as the
generator, registers and serves when it is on (the training itself: tests/test_train.py's time-budget run)."""

from __future__ import annotations

import torch


def test_the_ema_of_the_generators_weights_moves_toward_them_by_one_minus_the_decay():
    from prouigan_platform.training.worker import update_ema

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    before = [p.detach().clone() for p in ema.parameters()]
    model[1].running_mean.fill_(3.0)
    update_ema(ema, model, 0.9)
    for b, e, m in zip(before, ema.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * m)
    assert torch.equal(ema[1].running_mean, model[1].running_mean)  # buffers are copied, not averaged
