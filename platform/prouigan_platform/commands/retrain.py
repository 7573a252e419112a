"""`prouigan retrain -c CONFIG`: scheduled retraining (``retraining.py``): new faces -> new dataset version ->
fine-tune the champion -> evaluate -> gate.  Exit 0 (done or nothing to do), 3 (another retrain holds the lock)."""

from __future__ import annotations

import time

from prouigan_platform.config import config_from_args
from prouigan_platform.errors import Exit
from prouigan_platform.retraining import retrain
from prouigan_platform.runtime import init_ray


def run(args) -> int:
    cfg = config_from_args(args)
    init_ray()
    t0 = time.time()
    out = retrain(cfg)
    print(f"retrain: {out['status']} in {time.time() - t0:.0f} s")
    return Exit.BUSY if out["status"] == "busy" else Exit.OK
