"""Ingest face datasets into versioned WebDataset shards with Ray Data (local folder or s3://).

    list (driver) -> read, decode, validate, align, encode PNG (Ray Data, parallel) -> write shards (one Ray
    task per shard, temporary names) -> move shards into place -> write the manifest (last)

Only inputs that are new or changed since the latest version are processed; with nothing new it does no work
and says so.  Every input ends accepted or quarantined with a reason, and the summary's counts add up.

    prouigan shard --config cpu-small data.output=s3://prouigan/datasets/faces
    ray job submit --working-dir . -- python pipelines/shard.py --config cpu-small
"""

from __future__ import annotations

import sys
from collections import Counter

HELP = "ingest faces into versioned WebDataset shards (Ray Data), with quarantine and a manifest"


def add_arguments(parser) -> None:
    from prouigan_platform.cli import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--local", action="store_true",
                        help="run Ray Data on a private local Ray instead of RAY_ADDRESS / the embedded stack")


def run(args) -> int:
    from prouigan_platform.cli import config_from_args
    from prouigan_platform.dataset.build import SettingsChanged, build_version
    from prouigan_platform.dataset.sources import SourceError, list_sources
    from prouigan_platform.runtime import init_ray, use_embedded_stack

    cfg = config_from_args(args)
    root = cfg.data.output.rstrip("/")
    try:
        records = list_sources(cfg.data.sources)
    except SourceError as e:
        print(f"prouigan shard: error: {e}", file=sys.stderr)
        return 1
    print(f"shard: {len(records)} inputs listed from {len(cfg.data.sources)} source(s) -> {root}")
    if args.local:
        import ray

        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    else:
        use_embedded_stack()
        init_ray(log_to_driver=False)
    try:
        result = build_version(records, cfg.data, root, engine="ray", progress_every=10)
    except SettingsChanged as e:
        print(f"prouigan shard: error: {e}", file=sys.stderr)
        return 2
    if result.manifest is None:
        p = result.parent
        print(f"shard: nothing new — dataset version v{p['version']:04d} ({p['_uri']}) is current")
        return 0
    print_summary(result)
    if result.processed and not result.new_shards:
        reasons = Counter(q["reason"] for q in result.quarantined).most_common(1)
        print(f"prouigan shard: error: none of the {result.processed} inputs was accepted (most common reason: "
              f"{reasons[0][0] if reasons else '-'}); see the quarantine list in {result.manifest['_uri']}",
              file=sys.stderr)
        return 1
    return 0


def print_summary(r) -> None:
    m = r.manifest
    accepted = sum(int(s["count"]) for s in r.new_shards)
    reasons = Counter(q["reason"] for q in r.quarantined)
    nbytes = sum(int(s["bytes"]) for s in r.new_shards)
    print("\n" + "=" * 72)
    print(f"dataset version v{m['version']:04d}  ->  {m['_uri']}")
    print(f"  inputs processed  {r.processed:>7}   (+{r.duplicates} listed twice under one key)")
    if r.labelled or r.labels_reused:
        print(f"  labelled by dlib  {r.labelled:>7}   (+{r.labels_reused} labels reused from an earlier run)")
    print(f"  faces accepted    {accepted:>7}   in {len(r.new_shards)} new shard(s), {nbytes / 2**20:.1f} MiB")
    print(f"  quarantined       {sum(reasons.values()):>7}" + "".join(
        f"\n      {reason:<24}{n:>6}" for reason, n in reasons.most_common()))
    print("  the version, by source:")
    print(f"      {'source':<16}{'train':>8}{'val':>8}{'test':>8}{'quarantined':>13}")
    for name, counts in m.get("counts_by_source", {}).items():
        q = sum(m.get("quarantine_by_source", {}).get(name, {}).values())
        print(f"      {name:<16}" + "".join(f"{counts.get(sp, 0):>8}" for sp in ("train", "val", "test")) + f"{q:>13}")
    print(f"      {'all':<16}" + "".join(f"{m['counts'].get(sp, 0):>8}" for sp in ("train", "val", "test"))
          + f"{m['quarantined']:>13}")
    print(f"  digest {m['digest']}")
    if r.parent:
        print(f"  reused from v{r.parent['version']:04d}: {len(r.parent['shards'])} shard(s)")
    print(f"  time {r.seconds:.1f} s, {r.processed / max(r.seconds, 1e-9):.1f} inputs/s")
    print("=" * 72)


if __name__ == "__main__":
    from prouigan_platform.cli import run_as_script

    run_as_script("shard")
