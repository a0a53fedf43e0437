"""The one exception type users see: a one-line message that names the problem and the fix."""


class RivalError(ValueError):
    """Bad input or setting; the message says what to change. The CLI prints it without a traceback."""
