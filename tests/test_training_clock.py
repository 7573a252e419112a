"""How far a training run is, the same on every rank: by steps or the wall-time budget, whichever comes first,
agreed through rank 0's clock every few steps (pure: no stack)."""

from __future__ import annotations

import pytest


def test_progress_takes_the_step_count_or_the_time_budget_whichever_comes_first():
    from prouigan_platform.training.worker import progress

    assert progress(5, 10, 0.0, None) == 0.5
    assert progress(1, 100, 30.0, 60.0) == 0.5
    assert progress(90, 100, 30.0, 60.0) == 0.9


def test_the_budget_clock_broadcasts_every_few_steps_and_every_rank_gets_the_same_progress():
    """Two ranks with clocks that disagree (rank 1 runs 30% slow) take rank 0's value every 5 steps and
    extrapolate the same in between, so they stop on the same step; a broadcast is a sync, so it is rare."""
    from prouigan_platform.training.worker import BudgetClock

    shared: dict[int, float] = {}

    def broadcast_for(rank):
        def broadcast(value):  # what dist.broadcast(src=0) gives: rank 0 writes, everyone reads rank 0's value
            if rank == 0:
                shared[len(calls[0])] = value
            calls[rank].append(value)
            return shared[len(calls[rank]) - 1]
        return broadcast

    calls = {0: [], 1: []}
    clocks = [BudgetClock(10_000, 60.0, every=5, broadcast=broadcast_for(r)) for r in (0, 1)]
    seen = {0: [], 1: []}
    for step in range(0, 200):
        for rank, slow in ((0, 1.0), (1, 1.3)):  # rank 0 first, as a broadcast from it would order them
            seen[rank].append(clocks[rank](step, step * 0.4 * slow))  # 0.4 s a step: the budget ends at step 150
    assert seen[0] == seen[1]
    stop = next(i for i, d in enumerate(seen[0]) if d >= 1.0)
    assert 145 <= stop <= 155, stop
    assert len(calls[0]) == 40 and clocks[0].broadcasts == 40  # every 5th step, not every step
    assert all(b >= a for a, b in zip(seen[0], seen[0][1:], strict=False))  # progress never goes back

    # rank 0 speeds up 3x at step 52: the extrapolation runs ahead of the next broadcast, and progress holds
    # still until the clock catches up instead of going back (a schedule or the final mix must not switch back)
    clock = BudgetClock(10_000, 200.0, every=5, broadcast=lambda v: v)
    elapsed = [1.2 * s if s < 52 else 1.2 * 52 + 0.4 * (s - 52) for s in range(100)]
    out = [clock(s, elapsed[s]) for s in range(100)]
    assert all(b >= a for a, b in zip(out, out[1:], strict=False))
    assert out[55] == out[54] > elapsed[55] / 200  # held at the extrapolated value, ahead of the clock
    assert out[99] == pytest.approx(elapsed[99] / 200, abs=0.01)  # and caught up since


def test_a_slow_first_interval_does_not_run_the_budget_clock_ahead():
    """The first steps of a compiled run take minutes (torch.compile); extrapolating from them would put progress
    far ahead of the clock, holding the schedules and the printed ETA wrong until the clock caught up."""
    from prouigan_platform.training.worker import BudgetClock

    clock = BudgetClock(10_000, 600.0, every=10, broadcast=lambda v: v)
    # step 1 ends after 90 s of compiling, then 0.5 s a step; the discriminators join at step 45 and compile 60 s
    elapsed = [0.0] + [90.0 + 0.5 * s + (60.0 if s >= 45 else 0.0) for s in range(1, 90)]
    out = [clock(s, elapsed[s]) for s in range(90)]
    assert max(d - e / 600 for d, e in zip(out, elapsed, strict=True)) < 0.01, out
    assert out[-1] == pytest.approx(elapsed[-1] / 600, abs=0.01)


def test_the_budget_clock_of_one_process_reads_its_own_clock_every_step():
    from prouigan_platform.training.worker import BudgetClock

    clock = BudgetClock(100, 60.0, every=10)
    assert clock(1, 30.0) == 0.5 and clock(2, 45.0) == 0.75 and clock.broadcasts == 0
    assert BudgetClock(10, None, every=10, broadcast=lambda v: 0.0)(5, 999.0) == 0.5  # no budget: by steps
