"""One exception type for input a user can fix, so entry points print it as a paragraph, not a trace."""


class SegxError(RuntimeError):
    """A problem with the user's data, config or files; the message names the culprit and the fix."""
