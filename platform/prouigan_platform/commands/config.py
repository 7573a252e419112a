"""`prouigan config -c NAME k=v`: print the resolved configuration."""

from __future__ import annotations

from prouigan_platform.config import config_from_args


def run(args) -> int:
    print(config_from_args(args).to_yaml(), end="")
    return 0
