"""`python pipelines/judges.py ARGS` is `prouigan judges ARGS`: the entry point `ray job submit` runs.
The work is in prouigan_platform/commands/judges.py."""

from prouigan_platform.cli import run_as_script

if __name__ == "__main__":
    run_as_script("judges")
