"""`prouigan config -c NAME k=v`: print the resolved configuration."""

from __future__ import annotations

from prouigan_platform.config import config_from_args
from prouigan_platform.errors import Exit


def run(args) -> int:
    print(config_from_args(args).to_yaml(), end="")
    return Exit.OK
