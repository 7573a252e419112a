"""`python pipelines/hello.py ARGS` is `prouigan hello ARGS`: the entry point `ray job submit` runs.
The work is in prouigan_platform/commands/hello.py."""

from prouigan_platform.cli import run_as_script

if __name__ == "__main__":
    run_as_script("hello")
