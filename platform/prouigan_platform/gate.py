"""The registry gate: the alias ``champion`` moves only to a version measured better than the current one.

A candidate is promoted when its evaluation is complete (every face of the split read, every gate metric
measured, for it and for the champion) and it beats the champion on every gate metric, both scored in the same
evaluation on the same inputs.  With no champion yet, a complete evaluation promotes.  Every decision, with its
numbers and reason, is written as ``gate.*`` tags on the candidate version.  The move itself is a
compare-and-set: under the registry lock, the alias must still point where it pointed when the evaluation
started, so two gates racing cannot both promote.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field

import mlflow

from prouigan.vocabulary import METRICS
from prouigan_platform import run_names as names
from prouigan_platform import tracking
from prouigan_platform.registry import alias_version

CHAMPION = "champion"


@dataclass
class Decision:
    promote: bool
    reason: str
    candidate: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] | None = None
    champion_version: str | None = None

    @property
    def label(self) -> str:
        return "promoted" if self.promote else "refused"


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if METRICS[metric] == "max" else a < b


def decide(candidate: dict[str, float], champion: dict[str, float] | None, gate_metrics: list[str],
           problems: list[str], champion_version: str | None = None) -> Decision:
    cand = {k: candidate.get(k, float("nan")) for k in gate_metrics}
    champ = None if champion is None else {k: champion.get(k, float("nan")) for k in gate_metrics}
    d = Decision(False, "", cand, champ, champion_version)
    if problems:
        d.reason = "partial evaluation: " + "; ".join(problems)
        return d
    if not all(math.isfinite(v) for v in cand.values()):
        d.reason = "evaluation did not measure " + ", ".join(k for k, v in cand.items() if not math.isfinite(v))
        return d
    if champ is None:
        d.promote, d.reason = True, "no champion yet"
        return d
    vs = ", ".join(f"{k} {cand[k]:.4f} vs {champ[k]:.4f}" for k in gate_metrics)
    worse = [k for k in gate_metrics if not _better(k, cand[k], champ[k])]
    if worse:
        d.reason = f"does not beat champion v{champion_version} on {', '.join(worse)} ({vs})"
    else:
        d.promote, d.reason = True, f"beats champion v{champion_version} on every gate metric ({vs})"
    return d


def record(name: str, version: str, decision: Decision, context: dict[str, str]) -> None:
    """The decision, its numbers and what it was measured on, as tags of the candidate version."""
    client = mlflow.MlflowClient()
    tags = {names.GATE_DECISION: decision.label, names.GATE_REASON: decision.reason[:tracking.ERROR_CHARS],
            "gate.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "gate.champion_version": decision.champion_version or "none", **context}
    tags.update({f"gate.candidate.{k}": f"{v:.6g}" for k, v in decision.candidate.items()})
    tags.update({f"gate.champion.{k}": f"{v:.6g}" for k, v in (decision.champion or {}).items()})
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))


def record_failure(name: str, version: str, error: BaseException, context: dict[str, str]) -> Decision:
    d = Decision(False, f"evaluation failed: {type(error).__name__}: {error}")
    record(name, version, d, context)
    return d


def _set_fence(client, name: str, token: str, target: str, state: str, left: str | None = None) -> None:
    """This gate's word in the model's fence tag: its token, the version it moves to, and how far it got."""
    client.set_registered_model_tag(name, names.CHAMPION_FENCE, json.dumps(
        {"token": token, "target": target, "state": state, **({"left": left} if state != "moving" else {})}))


def _fence(client, name: str) -> dict:
    raw = client.get_registered_model(name).tags.get(names.CHAMPION_FENCE)
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}


def move_champion(name: str, version: str, expected: str | None, lock=None) -> tuple[bool, str]:
    """Point ``champion`` at ``version`` if it still points at ``expected`` (None: no champion yet).

    MLflow has no compare-and-set of an alias, so the move is fenced in the registry itself: the gate first writes
    its token into the model's ``prouigan.champion_fence`` tag, compares, moves the alias, records the token on
    the version, and reads the fence back.  A gate that stalled past its lock's lease between its check and its
    move finds another gate's token there: it puts the alias back where that gate moved it (or, where that gate
    has not moved it, where it was before), and refuses."""
    client = mlflow.MlflowClient()
    token = lock.token if lock is not None else uuid.uuid4().hex
    with lock or nullcontext():
        _set_fence(client, name, token, version, "moving")
        now = alias_version(name, CHAMPION)
        now_v = now.version if now else None
        if now_v != expected:
            _set_fence(client, name, token, version, "refused", left=now_v)
            return False, (f"champion moved from v{expected} to v{now_v} while this evaluation ran; "
                           "evaluate again against the new champion")
        if lock is not None:
            lock.check()  # fencing: a gate whose lease ran out meanwhile moves nothing
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, names.CHAMPION_FENCE, token)
        after = _fence(client, name)
        if after.get("token") == token:
            _set_fence(client, name, token, version, "moved", left=version)
            return True, f"champion -> v{version}"
        # another gate entered after this one: its word stands, this move is undone
        back = after.get("target") if after.get("state") == "moved" else expected
        cur = alias_version(name, CHAMPION)
        if cur is not None and cur.version == version:
            if back is None:
                client.delete_registered_model_alias(name, CHAMPION)
            else:
                client.set_registered_model_alias(name, CHAMPION, back)
        return False, (f"another gate moved the champion while this one stalled (its lock's lease ran out): "
                       f"this move to v{version} was undone, champion is v{back}; evaluate again")
