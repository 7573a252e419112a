"""Shared fixtures: the real faces in ../shared/faces (skipped when absent), the embedded stack on free
loopback ports (one per test session), small aligned faces for model tests."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from prouigan_platform.stack import SINGLE_NODE_ENV

# this process talks to the test stacks as their clients do, with Ray's single-node switch (read once, when Ray is
# imported: before any test module imports it)
os.environ.update(SINGLE_NODE_ENV)

REPO = Path(__file__).resolve().parents[1]
SHARED_FACES = Path(os.environ.get("PROUIGAN_SHARED_FACES", REPO.parent / "shared" / "faces"))
SHARED_CELEBA = Path(os.environ.get("PROUIGAN_SHARED_CELEBA", REPO.parent / "shared" / "celeba" / "train"))


def run_cli(stack, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`prouigan ARGS` in a subprocess pointed at the test stack (as a user's shell would be)."""
    env = {**os.environ, **stack.env(), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "prouigan_platform.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


def read_pts(path: Path) -> np.ndarray:
    body = path.read_text().split("{", 1)[1].split("}", 1)[0].split()
    return np.array(body, float).reshape(-1, 2)


@pytest.fixture(scope="session")
def shared_faces() -> Path:
    if not (SHARED_FACES / "helen_train").is_dir():
        pytest.skip(f"real faces not found at {SHARED_FACES} (research-licensed 300-W sample; a fresh clone "
                    "has no ../shared/faces — these tests run in CI, where it exists)")
    return SHARED_FACES


@pytest.fixture(scope="session")
def shared_celeba() -> Path:
    if not (SHARED_CELEBA / "MANIFEST.json").is_file():
        pytest.skip(f"CelebA photos not found at {SHARED_CELEBA} (non-commercial research licence; a fresh clone has "
                    "no ../shared/celeba — these tests run in CI, where it exists)")
    return SHARED_CELEBA


def aligned_faces(n: int, seed: int = 0):
    """n aligned 128x128 faces as (images uint8 (n,128,128,3), landmarks (n,68,2)): real ones from
    ../shared/faces when present, else synthetic ones."""
    from PIL import Image

    from prouigan.align import align, keypoints_from_68
    from prouigan.synthetic import synthetic_face

    imgs, lms = [], []
    if (SHARED_FACES / "helen_train").is_dir():
        files = sorted((SHARED_FACES / "helen_train").glob("*.jpg"))
        rng = np.random.default_rng(seed)
        for f in rng.choice(files, n, replace=False):
            lm = read_pts(f.with_suffix(".pts"))
            a = align(Image.open(f), *keypoints_from_68(lm), landmarks=lm)
            imgs.append(a.image)
            lms.append(a.landmarks)
    else:
        for i in range(n):
            img, lm = synthetic_face(seed * 1000 + i)
            a = align(img, *keypoints_from_68(lm), landmarks=lm)
            imgs.append(a.image)
            lms.append(a.landmarks)
    return np.stack(imgs), np.stack(lms)


@contextmanager
def own_stack(state_dir: Path, **kw):
    """A stack of a test's own on free ports, its environment exported while it runs; down (data kept) after."""
    from prouigan_platform import stack as st

    spec = st.StackSpec.on_free_ports(state_dir, **{"ray_num_cpus": 2, "object_store_mb": 256, **kw})
    saved = dict(os.environ)
    try:
        st.up(spec, log=lambda *_: None)
        os.environ.update(spec.env())
        yield spec
    finally:
        st.down(spec.state_dir, log=lambda *_: None)
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The real embedded stack on free ports, for this test session: Ray head (token auth), MLflow server, and the
    optional S3 test server, so that every S3 path of the platform is exercised (the store is its bucket)."""
    from prouigan_platform import stack as st

    spec = st.StackSpec.on_free_ports(tmp_path_factory.mktemp("platform"), s3=True, ray_num_cpus=4,
                                      object_store_mb=512)
    st.up(spec)
    saved = {k: os.environ.get(k) for k in spec.env()}
    os.environ.update(spec.env())
    yield spec
    try:
        import ray

        ray.shutdown()
    except Exception:
        pass
    st.down(spec.state_dir)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# What starts real services (a stack, a Ray instance): a fixture of these, or a call of these in the test itself.  A
# test that does is marked `stack`; a test marked `stack` does, or runs a command that starts Ray (train, shard,
# tune, hello, retrain, as a subprocess: not visible here).  The fast tier (`make test-fast`) runs the others only.
SERVICE_FIXTURES = {"stack", "durable_stack", "user_shell", "cluster", "ray_local", "ray_on_stack"}
SERVICE_PARAMS = {"s3"}  # a parametrised fixture that takes the stack for this value (tests/test_locks.py)
STARTS_SERVICES = ("own_stack(", "st.up(", "ray.init(", "init_ray(")
RUNS_RAY_COMMANDS = ('"train"', '"shard"', '"tune"', '"hello"', '"retrain"', "pipelines/")


def _source(item) -> str:
    import inspect

    try:
        return inspect.getsource(item.function)
    except (OSError, TypeError, AttributeError):
        return ""


def pytest_collection_modifyitems(config, items):
    """Markers tell the truth: a test that starts services is marked `stack`, and a test marked `stack` starts them
    (checked at collection, not assumed)."""
    wrong = []
    for item in items:
        marked, source = item.get_closest_marker("stack") is not None, _source(item)
        params = {p for p in getattr(getattr(item, "callspec", None), "params", {}).values() if isinstance(p, str)}
        starts = bool(SERVICE_FIXTURES & set(getattr(item, "fixturenames", ()))) or any(
            s in source for s in STARTS_SERVICES) or bool(SERVICE_PARAMS & params)
        if starts and not marked:
            wrong.append(f"{item.nodeid}: starts a service but is not marked stack")
        elif marked and not starts and not any(s in source for s in RUNS_RAY_COMMANDS):
            wrong.append(f"{item.nodeid}: marked stack but starts no service")
    if wrong:
        raise pytest.UsageError("test markers that do not tell the truth:\n  " + "\n  ".join(wrong))
