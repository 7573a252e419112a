"""`prouigan shard -c CONFIG`: ingest face datasets into a new versioned WebDataset dataset with Ray Data.

    list (driver) -> per block of inputs, in Ray Data tasks: read, decode, [dlib labels], validate, align, PNG,
    write the block's shards under temporary names -> move them into place -> write the manifest (last)

Only inputs that are new or changed since the latest version are processed; with nothing new it does no work and
says so.  Every input ends accepted or quarantined with a reason, and the summary's counts add up.  One shard run
per dataset at a time: another one finds the dataset's lock and exits with status 3 naming the holder (or waits,
with --wait).
"""

from __future__ import annotations

from collections import Counter

from prouigan_platform.config import config_from_args
from prouigan_platform.dataset.build import SettingsChanged, build_version
from prouigan_platform.dataset.sources import SourceError, list_sources
from prouigan_platform.errors import BadInput, Exit, UserError
from prouigan_platform.runtime import init_ray


def run(args) -> int:
    cfg = config_from_args(args)
    root = cfg.data.output.rstrip("/")
    try:
        records = list_sources(cfg.data.sources)
    except SourceError as e:
        raise UserError(str(e)) from None
    print(f"shard: {len(records)} inputs listed from {len(cfg.data.sources)} source(s) -> {root}", flush=True)
    init_ray(local=args.local)
    try:
        result = build_version(records, cfg.data, root, engine="ray", progress_every=10, wait_s=args.wait)
    except SettingsChanged as e:
        raise BadInput(str(e)) from None
    if result.manifest is None:
        p = result.parent
        print(f"shard: nothing new — dataset version v{p.version:04d} ({p.uri}) is current")
        return Exit.OK
    print(result.summary())
    if result.processed and not result.new_shards:
        reasons = Counter(q["reason"] for q in result.quarantined).most_common(1)
        raise UserError(f"none of the {result.processed} inputs was accepted (most common reason: "
                        f"{reasons[0][0] if reasons else '-'}); see the quarantine list in {result.manifest.uri}")
    return Exit.OK
