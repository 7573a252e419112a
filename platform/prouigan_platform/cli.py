"""The ``prouigan`` command: ``prouigan platform up|status|down|env``, ``prouigan config`` and one
subcommand per pipeline (each also runs as ``python pipelines/<name>.py`` for ``ray job submit``)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from prouigan_platform.config import ConfigError, load_config

# subcommand -> module under pipelines/ (imported only when used, so `prouigan platform` stays fast)
PIPELINES = {
    "hello": "pipelines.hello",
    "synth": "pipelines.synth",
    "shard": "pipelines.shard",
    "train": "pipelines.train",
    "tune": "pipelines.tune",
    "hallucinate": "pipelines.hallucinate",
    "evaluate": "pipelines.evaluate",
    "restore": "pipelines.restore",
    "retrain": "pipelines.retrain",
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None,
                        help="YAML file, or a name in pipelines/configs (e.g. cpu-small)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100")


def config_from_args(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def _platform_parser(sub) -> None:
    from prouigan_platform.stack import StackSpec

    d = StackSpec()
    p = sub.add_parser("platform", help="the embedded stack: Ray head, MLflow server, S3 server on 127.0.0.1")
    p.add_argument("action", choices=["up", "status", "down", "env"])
    p.add_argument("--state-dir", type=Path, default=None,
                   help="state folder (default .platform or $PROUIGAN_STATE_DIR)")
    p.add_argument("--s3-port", type=int, default=d.s3_port)
    p.add_argument("--mlflow-port", type=int, default=d.mlflow_port)
    p.add_argument("--ray-port", type=int, default=d.ray_port)
    p.add_argument("--dashboard-port", type=int, default=d.dashboard_port)
    p.add_argument("--ray-client-port", type=int, default=d.ray_client_port)
    p.add_argument("--num-cpus", type=int, default=d.ray_num_cpus, help="logical CPUs the Ray head offers")
    p.add_argument("--object-store-mb", type=int, default=d.object_store_mb)
    p.add_argument("--bucket", default=d.bucket)
    p.add_argument("--json", action="store_true", help="status as JSON")
    p.add_argument("--force", action="store_true", help="down: stop the S3 server even if its data cannot be saved")


def _run_platform(args: argparse.Namespace) -> int:
    from prouigan_platform import stack
    from prouigan_platform.runtime import default_state_dir

    state_dir = args.state_dir or default_state_dir()
    if args.action == "up":
        spec = stack.StackSpec(
            state_dir=state_dir, bucket=args.bucket, s3_port=args.s3_port, mlflow_port=args.mlflow_port,
            ray_port=args.ray_port, dashboard_port=args.dashboard_port, ray_client_port=args.ray_client_port,
            ray_num_cpus=args.num_cpus, object_store_mb=args.object_store_mb,
        )
        stack.up(spec)
        return 0
    if args.action == "down":
        stack.down(state_dir, force=args.force)
        return 0
    if args.action == "env":
        spec, _ = stack.load_state(state_dir)
        if spec is None:
            print(f"prouigan: error: no stack recorded in {state_dir}; run `prouigan platform up`", file=sys.stderr)
            return 1
        for k, v in spec.env().items():
            print(f"export {k}={v}")
        return 0
    rows = stack.status(state_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            state = "healthy" if r["healthy"] else ("running, NOT healthy" if r["running"] else "stopped")
            print(f"{r['service']:7s} {state:22s} pid={r['pid'] or '-':<8} {r['url']}")
    return 0 if all(r["healthy"] for r in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prouigan", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _platform_parser(sub)
    p = sub.add_parser("config", help="print the resolved configuration")
    add_config_arguments(p)
    for name, module in PIPELINES.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=mod.HELP, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_pipeline=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "platform":
            return _run_platform(args)
        if args.command == "config":
            print(config_from_args(args).to_yaml(), end="")
            return 0
        return int(args._pipeline.run(args) or 0)
    except ConfigError as e:
        print(f"prouigan: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prouigan: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the stack errors and pipeline input errors are meant to be read, not traced
        from prouigan_platform.stack import StackError

        if isinstance(e, (StackError, FileNotFoundError, PermissionError, RuntimeError)) and not _debug():
            print(f"prouigan: error: {e}", file=sys.stderr)
            return 1
        raise


def _debug() -> bool:
    import os

    return os.environ.get("PROUIGAN_DEBUG") == "1"


def run_as_script(name: str) -> None:
    """``python pipelines/<name>.py ARGS`` == ``prouigan <name> ARGS`` (for ray job submit / ray submit)."""
    sys.exit(main([name, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
