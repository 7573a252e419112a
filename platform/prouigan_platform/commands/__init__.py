"""One module per `prouigan` command: ``run(args) -> exit code``; the arguments are declared in ``cli.py``."""
