"""Errors meant for the user: the CLI prints them as one line and exits with ``code``, never with a traceback."""


class UserError(Exception):
    """A problem with what the user asked for or gave (a path, a value, a missing model)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class Stopped(BaseException):
    """The process was asked to stop (SIGTERM: `ray job stop`, a scheduler, `kill`).  A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` swallows it on the way out; runs end KILLED."""


def stop_on_sigterm() -> None:
    """SIGTERM raises ``Stopped`` in the main thread, so that runs are closed and the console says where to resume."""
    import signal

    def handler(signum, frame):
        raise Stopped("stopped by SIGTERM")

    signal.signal(signal.SIGTERM, handler)
