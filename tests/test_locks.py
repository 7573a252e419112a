"""The platform's exclusive locks, on local disk and in the S3 bucket: a live holder keeps its lock by renewing
the lease, a dead holder's lock is taken over once its lease runs out, and only the owner releases it."""

from __future__ import annotations

import time

import pytest

from prouigan_platform.locks import Lock, LockHeld


def _roots(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "locks")
    stack = request.getfixturevalue("stack")
    return f"s3://{stack.bucket}/tests/locks-{time.time_ns()}"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.stack)])
def root(request, tmp_path) -> str:
    return _roots(request, tmp_path)


def test_a_live_holder_keeps_its_lock_past_the_lease(root):
    holder = Lock(f"{root}/a.lock", lease_s=1.5, purpose="working")
    assert holder.acquire()
    try:
        time.sleep(3.5)  # more than two leases: the heartbeat renewed it
        other = Lock(f"{root}/a.lock", lease_s=1.5)
        assert not other.acquire()
        assert holder.lost is None
        with pytest.raises(LockHeld, match="held by .* \\(working\\)"):
            with other:
                pass
    finally:
        holder.release()
    assert Lock(f"{root}/a.lock").acquire()


def test_a_dead_holders_lock_is_taken_over_and_the_late_holder_cannot_release_it(root):
    dead = Lock(f"{root}/b.lock", lease_s=1.0, purpose="crashed", heartbeat=False)  # renews nothing, like a kill -9
    assert dead.acquire()
    taker = Lock(f"{root}/b.lock", lease_s=30, purpose="next")
    assert not taker.acquire()  # the lease still runs
    assert taker.acquire(wait_s=5, poll_s=0.2)  # ... until it runs out
    assert (taker.holder() or {}).get("purpose") == "next"
    dead.release()  # the late holder wakes up: it must not delete the new holder's lock
    assert (taker.holder() or {}).get("token") == taker.token
    assert not dead.renew() and dead.lost
    taker.release()
    assert taker.holder() is None
