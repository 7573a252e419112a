"""The ``prouigan`` command: it parses, then hands the arguments to ``prouigan_platform.commands.<name>.run``.

Every command's arguments are declared here, so ``prouigan --help`` and every argument error return at once:
nothing heavy (torch, Ray, MLflow) is imported before a command actually runs.  Each ``pipelines/<name>.py`` is
the same command as a script, for ``ray job submit``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys
from pathlib import Path

from prouigan_platform.errors import Exit, UserError, stop_on_sigterm, stop_reason

# name -> one-line help; the work of each is prouigan_platform/commands/<name>.py
COMMANDS = {
    "platform": "the embedded stack: Ray head and MLflow server on 127.0.0.1 (optional S3 server)",
    "config": "print the resolved configuration",
    "demo": "the whole platform on sample faces in minutes: shard, train, register, score vs bicubic",
    "hello": "smoke-test the stack: a Ray job and an MLflow run with an artifact",
    "synth": "write procedural sample faces (NAME.png + NAME.pts) for demos and tests",
    "shard": "ingest faces into versioned WebDataset shards (Ray Data), with quarantine and a manifest",
    "train": "train Pro-UIGAN with Ray Train (DDP), checkpointing and MLflow tracking",
    "tune": "search loss weights with Ray Tune + Optuna (TPE) + ASHA; every trial tracked in MLflow",
    "hallucinate": "16x16 thumbnails in a folder -> 128x128 faces (checkpoint, runs:/ or models:/ URI)",
    "evaluate": "score a model vs bicubic (fidelity, dlib alignment/identity, landmark regions); --promote: the gate",
    "judges": "train and list the face parser and expression classifier that judge hallucinated faces",
    "serve": "serve a registered version over HTTP once its files match the record made when it was registered",
    "restore": "find the faces of photos (tiny ones too), hallucinate them, paste them back into the photo upscaled",
    "retrain": "scheduled retraining: new faces -> new dataset version -> fine-tune -> evaluate -> gate",
}


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return v


MAX_UPSCALE = 8  # restore's largest upscale: the model's own 8x (prouigan_platform.restoring.MAX_UPSCALE, tested equal)


FIDELITY = 0.5  # restore's default --fidelity (prouigan_platform.restoring.FIDELITY, tested equal)


def fidelity_arg(text: str) -> float:
    """restore's --fidelity: a number 0..1."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number 0-1, got {text!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be 0-1 (0: all the model adds, 1: the upscaled photo), got {v:g}")
    return v


def upscale_arg(text: str) -> int | str:
    """restore's --upscale: ``auto`` or a whole number 1..MAX_UPSCALE."""
    if text == "auto":
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number 1-{MAX_UPSCALE}, got {text!r}") from None
    if not 1 <= v <= MAX_UPSCALE:
        raise argparse.ArgumentTypeError(f"must be 1-{MAX_UPSCALE} (1: the photo's own size), got {v}")
    return v


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML file, or a name in pipelines/configs (e.g. cpu-small)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100")


def _device_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--device", default=default, help="cpu, cuda, cuda:N or auto (cuda when there is one)")


def _platform(p) -> None:
    p.add_argument("action", choices=["up", "status", "down", "env"])
    p.add_argument("--state-dir", type=Path, default=None,
                   help="state folder (default .platform or $PROUIGAN_STATE_DIR)")
    p.add_argument("--host", default="127.0.0.1", help="the one address every service binds (default loopback)")
    p.add_argument("--s3", action="store_true", help="also run an S3-compatible test server (moto; in memory, "
                                                     "snapshotted at down) and make it the store")
    p.add_argument("--s3-port", type=int, default=9000)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--ray-port", type=int, default=6379)
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument("--ray-client-port", type=int, default=10001)
    p.add_argument("--num-cpus", type=positive_int, default=max(4, os.cpu_count() or 1),
                   help="logical CPUs the Ray head offers (>= 4: train workers plus Ray Data tasks)")
    p.add_argument("--object-store-mb", type=positive_int, default=1024)
    p.add_argument("--bucket", default="prouigan")
    p.add_argument("--json", action="store_true", help="status as JSON")
    p.add_argument("--force", action="store_true", help="down: stop the S3 server even if its data cannot be saved")


def _hello(p) -> None:
    _config_args(p)
    p.add_argument("--tasks", type=positive_int, default=8, help="number of Ray tasks to fan out")


def _synth(p) -> None:
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--count", type=positive_int, default=200)
    p.add_argument("--seed", type=int, default=0)


def _shard(p) -> None:
    _config_args(p)
    p.add_argument("--local", action="store_true",
                   help="run Ray Data on a private local Ray instead of RAY_ADDRESS / the embedded stack")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="when another shard run holds the dataset, wait this long for it (default: exit, status 3)")


def _train(p) -> None:
    _config_args(p)
    p.add_argument("--from-tune", metavar="RUN_ID", default=None,
                   help="train with the best config of a `prouigan tune` search (its MLflow parent run)")


def _tune(p) -> None:
    _config_args(p)
    p.add_argument("--output", type=Path, default=None, help="where best.yaml goes (default outputs/tune/NAME/)")


def _hallucinate(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint, runs:/ID/model or models:/NAME@ALIAS")
    p.add_argument("--input", type=Path, required=True, help="a folder of 16x16 PNG/JPEG thumbnails")
    p.add_argument("--output", type=Path, required=True, help="a folder (created) for the 128x128 PNGs")
    p.add_argument("--resize", action="store_true", help="resize other sizes to 16x16 instead of failing")
    p.add_argument("--batch-size", type=positive_int, default=64)
    _device_arg(p)


def _evaluate(p) -> None:
    _config_args(p)
    p.add_argument("--model", required=True, help="checkpoint, runs:/ID/model, models:/NAME@ALIAS or /VERSION")
    p.add_argument("--data", default=None,
                   help="dataset manifest URI (default: train.dataset, else the latest version in data.output)")
    p.add_argument("--split", default=None, choices=["train", "val", "test"], help="default: eval.split")
    p.add_argument("--source", default=None, help="score only this source's faces of the split (a mixed version: "
                                                  "e.g. celeba or faces); default: eval.source, else every face")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--promote", action="store_true", help="move 'champion' here if it beats the champion")
    _device_arg(p, "cpu")


def _serve(p) -> None:
    p.add_argument("--model", default="models:/prouigan@champion",
                   help="a registered version: models:/NAME@ALIAS or models:/NAME/N (default the champion)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default loopback)")
    p.add_argument("--port", type=positive_int, default=5001)


def _judges(p) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    t = sub.add_parser("train", help="train a judge and store it as the next version",
                       description="train a judge and store it as the next version")
    t.add_argument("kind", choices=["parser", "expression"])
    _config_args_only(t)
    t.add_argument("--parsing", type=Path, default=Path("../shared/parsing"),
                   help="parser: the CelebAMask-HQ folder (images/, masks/; default ../shared/parsing)")
    t.add_argument("--data", default=None, help="expression: dataset manifest URI with CelebA faces (default: "
                                                "train.dataset, else the latest version in data.output)")
    t.add_argument("--attributes", type=Path, default=None,
                   help="expression: CelebA's attribute table (default: ATTRIBUTES.txt beside the CelebA source)")
    t.add_argument("--minutes", type=positive_float, default=None, help="the training's time budget (default 10)")
    t.add_argument("--steps", type=positive_int, default=None, help="the training's step budget instead")
    t.add_argument("--seed", type=int, default=0)
    sub.add_parser("list", help="the stored judges and their own held-out scores",
                   description="the stored judges and their own held-out scores")


def _config_args_only(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML file, or a name in pipelines/configs (e.g. cpu-small)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override (repeatable)")


def _restore(p) -> None:
    p.add_argument("photos", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--model", default="models:/prouigan@champion",
                   help="checkpoint, runs:/ID/model or models:/NAME@ALIAS (default models:/prouigan@champion)")
    p.add_argument("--upscale", type=upscale_arg, default="auto",
                   help=f"the output photo is N times larger, N = 1-{MAX_UPSCALE} (default auto: the median face's "
                        "alignment square brought near the model's 128 px)")
    p.add_argument("--background", choices=["bicubic", "lanczos"], default="bicubic",
                   help="how the photo around the faces is upscaled (default bicubic)")
    p.add_argument("--max-megapixels", type=float, default=64.0,
                   help="refuse an output photo larger than this (default 64)")
    p.add_argument("--detector", choices=["yunet", "dlib"], default="yunet",
                   help="yunet (default: faces from ~10 px wide, 5 points) or dlib (HOG + 68 points, the eval extra: "
                        "faces from ~40 px)")
    p.add_argument("--upsample", type=int, default=None, choices=[0, 1, 2, 3, 4],
                   help="yunet: the enlargement of its small-face pass (default 3; 0 or 1: none); dlib: its image "
                        "pyramid's upsamplings (default 1)")
    p.add_argument("--threshold", type=float, default=None, help="yunet: the least score of a face (default 0.7)")
    p.add_argument("--landmarks", choices=["yunet", "dlib"], default="yunet",
                   help="the points that align each face found by yunet: its own five (default), or dlib's 68 "
                        "(the eval extra; non-commercial licence), which place small faces about twice as well")
    p.add_argument("--thumbnail", type=Path, default=None,
                   help="a 16x16 face to use for the first (largest) face instead of the photo's own")
    p.add_argument("--faces", action="store_true", help="also write each face's thumbnail and result")
    p.add_argument("--thumbnail-only", action="store_true",
                   help="hallucinate each face from its 16x16 thumbnail alone, as the model was trained (default: a "
                        "face brings its own pixels too: at the model's 32- or 64-px stage where it is larger than "
                        "16 px, then by back-projection onto the photo)")
    p.add_argument("--fidelity", type=fidelity_arg, default=None,
                   help="0-1: the share of the upscaled photo blended back into each face (inside its mask); 0 keeps "
                        "all the model adds, 1 gives the upscaled photo back (default "
                        f"{FIDELITY:g}, chosen on the val faces: BENCHMARKS.md \"Tiny faces\")")
    _device_arg(p, "cpu")


# commands that find the embedded stack (when the environment names no cluster) before their work starts
USES_STACK = {"hello", "shard", "train", "tune", "hallucinate", "evaluate", "restore", "retrain", "judges", "serve"}

ARGUMENTS = {"platform": _platform, "config": _config_args, "demo": lambda p: None, "hello": _hello,
             "synth": _synth, "shard": _shard, "train": _train, "tune": _tune, "hallucinate": _hallucinate,
             "evaluate": _evaluate, "judges": _judges, "serve": _serve, "restore": _restore, "retrain": _config_args}


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (exit 2), pointing at --help instead of printing the usage block."""

    def error(self, message: str):
        self.exit(Exit.BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prouigan",
                     description="Pro-UIGAN: 128x128 faces from occluded 16x16 thumbnails, and the Ray + MLflow "
                                 "platform that makes the data, trains, tracks, gates and serves the models.",
                     epilog="Start with `prouigan platform up`, or `prouigan demo` for the whole path in minutes. "
                            "`prouigan COMMAND --help` for a command's arguments.")
    parser.add_argument("--verbose", "-v", action="store_true", help="show Ray's own log lines and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, help_ in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        ARGUMENTS[name](p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["PROUIGAN_VERBOSE"] = "1"
    else:  # MLflow's and Ray Data's INFO lines, MLflow's download bars: read when those libraries are imported
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # we print the run's address
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    stop_on_sigterm()  # a SIGTERM (`ray job stop`, a scheduler) unwinds like Ctrl-C: runs end KILLED, locks freed
    os.umask(0o077)  # private by default: what a command writes (shards, checkpoints, reports) is this user's alone
    try:
        if args.command in USES_STACK:
            # before Ray or MLflow is imported: Ray reads its auth settings (RAY_AUTH_MODE, the token path) once
            from prouigan_platform.runtime import prepare_local_ray, use_embedded_stack

            use_embedded_stack()
            prepare_local_ray(getattr(args, "local", False))
        # the command's module imports what its work needs (torch, Ray, MLflow): only now, after parsing
        command = importlib.import_module(f"prouigan_platform.commands.{args.command}")
        return int(command.run(args) or 0)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (errors.Stopped)
        why = stop_reason(e)
        print(f"prouigan {args.command}: {why}", file=sys.stderr)
        return Exit.TERMINATED if "SIGTERM" in why else Exit.INTERRUPTED
    except Exception as e:
        code = _expected(e)
        if code is None or args.verbose:
            raise
        print(f"prouigan {args.command}: error: {_message(e)}", file=sys.stderr)
        return code


def _expected(e: Exception) -> int | None:
    """The exit code of an error meant for the user (one line, no traceback); None for a bug."""
    # imported only when there is an error: up front they would cost every command its start-up time
    from prouigan_platform.config import ConfigError

    if isinstance(e, UserError):
        return e.code
    if isinstance(e, ConfigError):
        return Exit.BAD_INPUT
    from prouigan_platform.locks import LockHeld, LockLost

    if isinstance(e, (LockHeld, LockLost)):
        return Exit.BUSY
    from prouigan_platform.stack import StackError

    if isinstance(e, StackError):
        return e.code
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return Exit.FAILED
    if _machine_error(e) is not None:  # the machine's, not a bug: a full disk, a read-only one
        return Exit.FAILED
    return None


USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EMFILE, errno.ENAMETOOLONG}


def _machine_error(e: BaseException) -> OSError | None:
    """The full-disk (read-only disk, …) error behind ``e``: ``e`` itself, its causes, or, for an error raised in
    a Ray task (a Ray Data block writing a shard), the one its text names: Ray sends the remote traceback as text,
    and the cause's own chain does not survive the trip."""
    seen, x = set(), e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in USER_ERRNOS:
            return x
        x = getattr(x, "cause", None) or x.__cause__ or x.__context__
    if "RayTaskError" in type(e).__name__ or "UserCodeException" in type(e).__name__:
        for m in re.finditer(r"\[Errno (\d+)\] ([^\n:]+)", str(e)):
            if int(m.group(1)) in USER_ERRNOS:
                return OSError(int(m.group(1)), m.group(2).strip())
    return None


def _message(e: Exception) -> str:
    """One line; a stack failure keeps the log lines it quotes."""
    from prouigan_platform.stack import StackError  # see _expected

    if (os_err := _machine_error(e)) is not None:
        return f"{os_err.strerror}" + (f": {os_err.filename}" if os_err.filename else "")
    text = str(e).strip() or type(e).__name__
    return text if isinstance(e, StackError) else " ".join(text.split())


def run_as_script(name: str) -> None:
    """``python pipelines/<name>.py ARGS`` == ``prouigan <name> ARGS`` (for ray job submit / ray submit)."""
    sys.exit(main([name, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
