"""Errors meant for the user: the CLI prints them as one line and exits with ``code``, never with a traceback.
The exit codes are named here, once (docs/failure-modes.md lists them)."""

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    FAILED = 1  # anything else the user can fix: a missing file, a failed or partial evaluation, a full disk
    BAD_INPUT = 2  # an argument, a config value or an input file the command refuses
    BUSY = 3  # another run holds the lock (or took it over: this run's lease ran out)
    INTERRUPTED = 130  # Ctrl-C
    TERMINATED = 143  # SIGTERM


class UserError(Exception):
    """A problem with what the user asked for or gave (a path, a value, a missing model)."""

    def __init__(self, message: str, code: int = Exit.FAILED):
        super().__init__(message)
        self.code = code


class BadInput(UserError):
    """An argument, config value or input file the command refuses (exit 2)."""

    def __init__(self, message: str):
        super().__init__(message, Exit.BAD_INPUT)


class Stopped(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM: `ray job stop`, a scheduler, `kill`).  A KeyboardInterrupt, so that it
    unwinds like Ctrl-C, also out of a blocking ``ray.get`` (Ray turns only a KeyboardInterrupt raised by a signal
    handler into an interrupt, and raises a plain KeyboardInterrupt then: ``stop_reason`` remembers the signal)."""


_signalled: str | None = None


def stop_on_sigterm() -> None:
    """SIGTERM raises ``Stopped`` in the main thread, so that runs are closed and the console says where to resume."""
    import signal

    def handler(signum, frame):
        global _signalled
        _signalled = "stopped by SIGTERM"
        raise Stopped(_signalled)

    signal.signal(signal.SIGTERM, handler)


def stop_reason(error: BaseException) -> str:
    """Why an interrupted process stopped: the signal it got, else Ctrl-C."""
    return _signalled or (str(error) if isinstance(error, Stopped) else "interrupted (Ctrl-C)")
