"""The one exception type that launchers turn into a one-line message instead of a traceback,
and how any exception is quoted inside such a line."""


class UserError(Exception):
    """A problem with the user's input or config, with the fix in its message.

    Raised before anything in save_dir is written, so a bad input never damages a run.
    """


def first_line(error: BaseException, limit: int = 300) -> str:
    """'TypeName: its first non-empty line', at most `limit` characters of the message; the type
    alone for an exception with no message (MemoryError(), a bare KeyError())."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    name = type(error).__name__
    return f'{name}: {lines[0][:limit]}' if lines else name
