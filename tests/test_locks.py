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


def test_an_expired_lock_that_cannot_be_removed_is_waited_on_within_the_deadline_not_spun_on(root, monkeypatch):
    """Someone else replaced the expired record first, again and again (or the delete keeps failing): the taker waits
    between tries and gives up at its deadline; a store that denies the delete is one PermissionError."""
    dead = Lock(f"{root}/c.lock", lease_s=0.2, purpose="crashed", heartbeat=False)
    assert dead.acquire()
    time.sleep(0.4)  # its lease has run out
    taker = Lock(f"{root}/c.lock", lease_s=30, purpose="next")
    tries = []
    monkeypatch.setattr(taker, "_delete_if", lambda rec: tries.append(rec) or False)
    t0 = time.monotonic()
    assert not taker.acquire(wait_s=1.0, poll_s=0.25)
    assert 1.0 <= time.monotonic() - t0 < 3 and 3 <= len(tries) <= 6  # one try per poll, not thousands

    def denied(rec):
        raise PermissionError(f"{taker.uri}: the expired lock cannot be removed (AccessDenied)")

    monkeypatch.setattr(taker, "_delete_if", denied)
    with pytest.raises(PermissionError, match="AccessDenied"):
        taker.acquire(wait_s=5)
    dead.release()


def test_moving_a_shard_into_place_never_overwrites_the_winners(root):
    """The shard fence's last step: a stale shard run whose move comes after the winner's is refused by the store
    itself (S3: a conditional write, If-None-Match: *), and the winner's bytes stay."""
    from prouigan_platform import storage

    storage.write_bytes_atomic(f"{root}/tmp/a.tar", b"winner")
    storage.move_exclusive(f"{root}/tmp/a.tar", f"{root}/shards/train-000000.tar")
    assert not storage.exists(f"{root}/tmp/a.tar")
    storage.write_bytes_atomic(f"{root}/tmp/b.tar", b"stale")
    with pytest.raises(FileExistsError):
        storage.move_exclusive(f"{root}/tmp/b.tar", f"{root}/shards/train-000000.tar")
    assert storage.read_bytes(f"{root}/shards/train-000000.tar") == b"winner"
