"""`prouigan retrain` on the real stack: new faces -> incremental version -> fine-tune the champion -> gate;
no new faces -> nothing; a failing evaluation -> champion unchanged and the failure in MLflow; concurrent
retrains and concurrent promotions cannot both win."""

from __future__ import annotations

import json
import threading

import mlflow
import pytest

from prouigan_platform import gate
from prouigan_platform import run_names as names
from prouigan_platform.locks import Lock
from tests.conftest import run_cli
from tests.test_evaluate import _register

pytestmark = pytest.mark.stack
MODEL = "prouigan-retrain-test"


def _common(stack, faces: int) -> list[str]:
    b = stack.bucket
    return ["-c", "smoke", "name=rt", f"data.sources=[{{kind: synthetic, count: {faces}}}]",
            f"data.output=s3://{b}/datasets/retrain-test", "data.val_fraction=0.2", "data.test_fraction=0.3",
            f"train.storage=s3://{b}/retrain-ckpt", "tracking.experiment=retrain-test",
            f"tracking.registered_model={MODEL}", "train.steps=12", "train.val_every=6", "train.checkpoint_every=6",
            "train.lr_g=0.01", "eval.dlib=false", "eval.gate_metrics=[psnr]"]


def _versions(client) -> list[str]:
    return sorted(v.version for v in client.search_model_versions(f"name='{MODEL}'"))


@pytest.fixture(scope="module")
def seeded(stack, tmp_path_factory):
    """A deliberately bad champion (loud noise over the face), as a hand-registered first model would be."""
    v = _register(stack, "bad", tmp_path_factory.mktemp("seed"), MODEL)
    client = mlflow.MlflowClient(stack.mlflow_uri)
    client.set_registered_model_alias(MODEL, gate.CHAMPION, v)
    return client, v


@pytest.mark.slow  # about a minute or more on 2 cores: `make test-slow` and CI
def test_retrain_promotes_new_data_then_does_nothing_then_keeps_the_champion_on_a_failed_evaluation(stack, seeded):
    client, bad = seeded
    champion = lambda: client.get_model_version_by_alias(MODEL, gate.CHAMPION).version  # noqa: E731
    # 1. faces the champion never saw: shard, fine-tune from the champion, evaluate, promote
    out = run_cli(stack, "retrain", *_common(stack, 30))
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    assert "dataset version v0001" in log and f"from champion v{bad}" in log and "generator initialised from" in log
    new = champion()
    assert new != bad and "retrain: promoted" in log
    tags = client.get_model_version(MODEL, new).tags
    assert tags["gate.decision"] == "promoted"
    assert float(tags["gate.candidate.psnr"]) > float(tags["gate.champion.psnr"])
    runs = client.search_runs([client.get_experiment_by_name("retrain-test-retrain").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"] and runs[0].data.tags["gate.decision"] == "promoted"
    # 2. nothing new: no work, no version, says so
    before = _versions(client)
    out = run_cli(stack, "retrain", *_common(stack, 30))
    assert out.returncode == 0 and "nothing to do" in out.stdout, (out.stdout + out.stderr)[-3000:]
    assert _versions(client) == before and champion() == new
    # 3. new faces, but the evaluation is partial (eval.limit): FAILED in MLflow, champion unchanged
    out = run_cli(stack, "retrain", *_common(stack, 40), "eval.limit=1")
    log = out.stdout + out.stderr
    assert out.returncode != 0 and "partial evaluation" in log, log[-4000:]
    assert "dataset version v0002" in log and champion() == new
    failed = [r for r in client.search_runs([runs[0].info.experiment_id]) if r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["failed_step"] == "evaluate"
    assert "partial evaluation" in failed[0].data.tags["error"]
    refused = client.get_model_version(MODEL, failed[0].data.tags["candidate"].rsplit("/", 1)[1]).tags
    assert refused["gate.decision"] == "refused"


def test_a_second_retrain_started_meanwhile_does_nothing(stack, seeded):
    from prouigan_platform.locks import retrain_lock

    lock = retrain_lock(MODEL)  # what a retrain of another recipe (other storage) of the same model holds
    assert lock.acquire()
    try:
        out = run_cli(stack, "retrain", *_common(stack, 30))
    finally:
        lock.release()
    assert out.returncode == 3 and "another retrain holds" in out.stdout, (out.stdout + out.stderr)[-3000:]


def test_two_gates_racing_for_the_champion_cannot_both_promote(stack, seeded, tmp_path):
    """Both compared against the same champion; the compare-and-set under the registry lock lets one move it."""
    from prouigan_platform.locks import registry_lock

    client, _ = seeded
    a, b = _register(stack, "good", tmp_path, MODEL), _register(stack, "good", tmp_path, MODEL)
    expected = client.get_model_version_by_alias(MODEL, gate.CHAMPION).version
    start, results = threading.Barrier(2), {}

    def promote(v):
        start.wait()
        results[v] = gate.move_champion(MODEL, v, expected, lock=registry_lock(MODEL))

    threads = [threading.Thread(target=promote, args=(v,)) for v in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wins = [v for v, (moved, _) in results.items() if moved]
    assert len(wins) == 1 and client.get_model_version_by_alias(MODEL, gate.CHAMPION).version == wins[0]
    loser = next(v for v in (a, b) if v not in wins)
    assert "champion moved" in results[loser][1]


def test_one_server_spelt_two_ways_takes_one_registry_lock(stack):
    from prouigan_platform.locks import registry_lock

    port = stack.mlflow_uri.rsplit(":", 1)[1]
    assert registry_lock(MODEL, f"http://127.0.0.1:{port}").uri == registry_lock(MODEL, f"http://localhost:{port}/").uri


def test_a_gate_stalled_past_its_lease_undoes_its_move_and_refuses(stack, seeded, tmp_path):
    """Gate A passes its fence check, then stalls (a long GC, SIGSTOP) until its lease runs out; gate B takes the
    lock and promotes.  When A wakes and moves the alias, the fence it reads back in the registry is B's: A puts
    the champion back to B's version and refuses."""
    import time

    from prouigan_platform.locks import registry_lock

    client, _ = seeded
    a, b = _register(stack, "good", tmp_path, MODEL), _register(stack, "good", tmp_path, MODEL)
    expected = client.get_model_version_by_alias(MODEL, gate.CHAMPION).version
    results = {}

    class Stalls(Lock):
        def check(self):
            super().check()  # still ours: the move is allowed ...
            time.sleep(self.lease_s + 0.5)  # ... then the holder stalls past its lease
            t = threading.Thread(target=lambda: results.update(b=gate.move_champion(MODEL, b, expected,
                                                                                    lock=registry_lock(MODEL))))
            t.start()
            t.join()

    stalled = registry_lock(MODEL)
    stalled = Stalls(stalled.uri, lease_s=1.0, purpose="a gate that stalls", heartbeat=False)
    moved, why = gate.move_champion(MODEL, a, expected, lock=stalled)
    assert results["b"] == (True, f"champion -> v{b}")
    assert not moved and "another gate moved the champion" in why and f"undone, champion is v{b}" in why
    assert client.get_model_version_by_alias(MODEL, gate.CHAMPION).version == b
    fence = json.loads(client.get_registered_model(MODEL).tags[names.CHAMPION_FENCE])
    assert fence["state"] == "moved" and fence["target"] == b and fence["token"] != stalled.token
    assert client.get_model_version(MODEL, b).tags[names.CHAMPION_FENCE] == fence["token"]
