"""Where the platform keeps things on this machine, and ``${VAR}`` in config values.

    state folder   $PROUIGAN_STATE_DIR, else ./.platform   (the embedded stack's processes, logs, MLflow db)
    store          $PROUIGAN_STORE, else <state folder>/store (datasets, checkpoints, locks, MLflow artifacts)
    outputs        $PROUIGAN_OUTPUTS, else ./outputs          (reports, pictures, best configs: things to read)

The store is local disk by default: a write that returned is on disk, whatever happens to a service.  Point
PROUIGAN_STORE at ``s3://bucket[/prefix]`` (with AWS_ENDPOINT_URL for a non-AWS server) and every default path
of every config goes there instead.  Config values name it as ``${PROUIGAN_STORE}/datasets/faces``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def state_dir() -> Path:
    return Path(os.environ.get("PROUIGAN_STATE_DIR", ".platform")).expanduser().resolve()


def outputs_dir(*parts: str) -> Path:
    """Where a command writes what a person reads (evaluation reports, the demo's picture, a search's best.yaml)."""
    return Path(os.environ.get("PROUIGAN_OUTPUTS", "outputs")).expanduser().joinpath(*parts)


def store_root() -> str:
    store = os.environ.get("PROUIGAN_STORE")
    if store:
        return store.rstrip("/") if store.startswith("s3://") else str(Path(store).expanduser().resolve())
    return str(state_dir() / "store")


def expand(value: str) -> str:
    """``${PROUIGAN_STORE}`` and ``${NAME}`` (any environment variable) in a config string.  Unknown -> KeyError."""

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name == "PROUIGAN_STORE":
            return store_root()
        if name == "PROUIGAN_STATE_DIR":
            return str(state_dir())
        if name not in os.environ:
            raise KeyError(f"${{{name}}} is not set in the environment")
        return os.environ[name]

    return _VAR.sub(sub, value)


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<secret>[^/@\s]*)@")
_SECRET_PARAM = re.compile(r"(?P<key>[?&;](?:[A-Za-z0-9_.-]*(?:secret|password|passwd|token|access_key|"
                           r"session_key|credential|signature)[A-Za-z0-9_.-]*))=(?P<value>[^&;#\s]*)", re.IGNORECASE)


def redact(text: str) -> str:
    """A string with the credentials a URL may carry masked: the password of ``scheme://user:password@host`` and the
    value of query parameters named like a secret (``secret_key=``, ``token=``, ``password=``, ...)."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}=***", text)
