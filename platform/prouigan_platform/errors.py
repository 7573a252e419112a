"""Errors meant for the user: the CLI prints them as one line and exits with ``code``, never with a traceback."""


class UserError(Exception):
    """A problem with what the user asked for or gave (a path, a value, a missing model)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code
