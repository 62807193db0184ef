"""What every launcher shares: the --verbose flag, quiet library logs, and one-line errors."""

import contextlib
import logging as std_logging
import sys
from collections.abc import Iterator
from typing import NoReturn

from absl import flags, logging

from muomni_jax.errors import UserError

VERBOSE = flags.DEFINE_bool('verbose', False, 'Show full tracebacks for input errors.')


def fail(message: str) -> NoReturn:
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """A UserError becomes `error: <message>` on stderr and exit status 2 (a traceback with
    --verbose). Library INFO logs (Orbax logs every save, matplotlib its font cache) are hidden
    unless --verbose."""
    if not VERBOSE.value:
        logging.set_verbosity(logging.WARNING)
        _quiet_background_failures()
    try:
        yield
    except UserError as e:
        if VERBOSE.value:
            raise
        fail(str(e))


_quieted = False  # Once per process: the hooks below wrap the ones they find.


def _quiet_background_failures() -> None:
    """Hides the echoes of a failed asynchronous save. Orbax's threads and asyncio tasks log each
    failed write (with tracebacks, hundreds of lines for one full disk), and their callbacks
    raise again as the event loops close; the failure itself reaches the main thread, where
    checkpointing turns it into one line. --verbose shows them all."""
    global _quieted
    if _quieted:
        return
    _quieted = True

    def from_background(record: std_logging.LogRecord) -> bool:
        echo = record.levelno >= std_logging.ERROR and (
            '/orbax/' in record.pathname or record.name == 'asyncio'
        )
        return not echo

    std_logging.getLogger().addFilter(from_background)
    for handler in std_logging.getLogger().handlers:
        handler.addFilter(from_background)

    default_unraisable = sys.unraisablehook
    default_excepthook = sys.excepthook

    def unraisable(info) -> None:
        code = getattr(info.object, 'cr_code', None)  # A coroutine dropped mid-write.
        if (code is not None and '/orbax/' in code.co_filename) or _closing_loop(info.exc_value):
            return
        default_unraisable(info)

    def excepthook(exc_type, value, traceback) -> None:
        if not _closing_loop(value):
            default_excepthook(exc_type, value, traceback)

    sys.unraisablehook = unraisable
    sys.excepthook = excepthook


def _closing_loop(error: BaseException | None) -> bool:
    """A callback into an event loop Orbax already closed, or Python's own shutdown."""
    return (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed') or (
        isinstance(error, ImportError) and 'Python is likely shutting down' in str(error)
    )
