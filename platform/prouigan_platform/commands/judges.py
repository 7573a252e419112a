"""`prouigan judges train parser|expression`, `prouigan judges list`: the face parser and the expression classifier
that `prouigan evaluate` uses for the paper's downstream table (``prouigan_platform.judging``).

    prouigan judges train parser --minutes 15                 # ../shared/parsing: 900 train, 100 held out
    prouigan judges train expression -c cpu-mixed --minutes 15  # CelebA's Smiling / Mouth_Slightly_Open
    prouigan judges list
"""

from __future__ import annotations

from prouigan_platform import judging
from prouigan_platform.config import config_from_args
from prouigan_platform.errors import Exit


def run(args) -> int:
    if args.action == "list":
        return _list()
    minutes = args.minutes if args.minutes is not None or args.steps else 10.0
    if args.kind == "parser":
        j = judging.train_parser(args.parsing, minutes=minutes, steps=args.steps, seed=args.seed)
    else:
        from prouigan_platform.promotion import dataset_uri

        cfg = config_from_args(args)
        j = judging.train_expression(dataset_uri(cfg, args.data), args.attributes, minutes=minutes, steps=args.steps,
                                     seed=args.seed)
    print(f"judges: stored {j.label} at {judging.judges_root(j.kind)}/v{j.version:04d}.json; `prouigan evaluate` "
          "uses the latest of each")
    return Exit.OK


def _list() -> int:
    any_ = False
    for kind in judging.KINDS:
        for v in judging.versions(kind):
            any_ = True
            j = judging.load(kind, v)
            h = j.record.get("held_out", {})
            if kind == "parser":
                what = f"held-out mean F1 {h.get('mean_f1')}, mIoU {h.get('miou')} ({h.get('faces')} faces)"
            else:
                t = h.get("test", {})
                what = f"test ({t.get('faces')} faces): " + ", ".join(
                    f"{e} accuracy {t[e]['accuracy']} (balanced {t[e]['balanced_accuracy']})"
                    for e in judging.EXPRESSIONS if e in t)
            print(f"{kind} v{v}  {j.record.get('created')}  {j.record['training']['steps']} steps  {what}")
    if not any_:
        print(f"no judge stored under {judging.judges_root('parser').rsplit('/', 1)[0]}; train them with "
              "`prouigan judges train parser` and `prouigan judges train expression`")
    return Exit.OK
