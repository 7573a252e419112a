"""Errors meant for the user: the CLI prints them as one line and exits with ``code``, never with a traceback."""


class UserError(Exception):
    """A problem with what the user asked for or gave (a path, a value, a missing model)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


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
