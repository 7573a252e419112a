"""`prouigan serve --model models:/prouigan@champion`: serve a registered version over HTTP, only after each of its
files is checked against the sha256 recorded when it was registered (``registry.verified_files``).

    prouigan serve --model models:/prouigan@champion                 # http://127.0.0.1:5001/invocations
    prouigan serve --model models:/prouigan/7 --port 5002

It downloads the version, checks it, then hands the checked copy to `mlflow models serve` (this process becomes
the server): what serves is what was registered, whatever the artifact store holds later.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from prouigan_platform.errors import BadInput, Exit, UserError


def run(args) -> int:
    if not args.model.startswith("models:/"):
        raise BadInput(f"serve takes a registered version (models:/NAME@ALIAS or models:/NAME/N), got {args.model}: "
                       "only those have a record of their files to check")
    from prouigan_platform.registry import files_sha256, registered_version, verified_files

    version = registered_version(args.model)
    root = verified_files(args.model, version, Path(tempfile.mkdtemp(prefix="prouigan-serve-")))
    bindir = str(Path(sys.executable).parent)  # mlflow starts `uvicorn` from PATH, as in an activated venv
    mlflow = shutil.which("mlflow", path=bindir + os.pathsep + os.environ.get("PATH", ""))
    if mlflow is None:
        raise UserError("the mlflow command is not installed beside this Python; `pip install mlflow`")
    print(f"serve: {args.model} = {version.name} v{version.version}: its {len(files_sha256(root))} files match their "
          f"record; serving that copy ({root}) at http://{args.host}:{args.port}/invocations", flush=True)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    os.execve(mlflow, [mlflow, "models", "serve", "-m", str(root), "--env-manager", "local", "-h", args.host,
                       "-p", str(args.port)], env)
    return Exit.OK  # not reached: this process is the server now
