"""`python pipelines/serve.py ARGS` is `prouigan serve ARGS`: the entry point `ray job submit` runs.
The work is in prouigan_platform/commands/serve.py."""

from prouigan_platform.cli import run_as_script

if __name__ == "__main__":
    run_as_script("serve")
