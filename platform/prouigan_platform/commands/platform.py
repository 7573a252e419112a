"""`prouigan platform up|status|down|env`: the embedded stack."""

from __future__ import annotations

import json

from prouigan_platform import stack
from prouigan_platform.errors import Exit, UserError
from prouigan_platform.paths import state_dir as default_state_dir


def run(args) -> int:
    state_dir = args.state_dir or default_state_dir()
    if args.action == "up":
        spec = stack.StackSpec(
            state_dir=state_dir, host=args.host, s3=args.s3, bucket=args.bucket, s3_port=args.s3_port,
            mlflow_port=args.mlflow_port, ray_port=args.ray_port, dashboard_port=args.dashboard_port,
            ray_client_port=args.ray_client_port, ray_num_cpus=args.num_cpus, object_store_mb=args.object_store_mb,
        )
        stack.up(spec)
        return Exit.OK
    if args.action == "down":
        stack.down(state_dir, force=args.force)
        return Exit.OK
    if args.action == "env":
        spec, _ = stack.load_state(state_dir)
        if spec is None:
            raise UserError(f"no stack recorded in {state_dir}; run `prouigan platform up`")
        for k, v in spec.env().items():
            print(f"export {k}={v}")
        return Exit.OK
    rows = stack.status(state_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            state = "healthy" if r["healthy"] else ("running, NOT healthy" if r["running"] else "stopped")
            print(f"{r['service']:7s} {state:22s} pid={r['pid'] or '-':<8} {r['url']}")
    return Exit.OK if all(r["healthy"] for r in rows) else Exit.FAILED
