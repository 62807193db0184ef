"""What every launcher shares: the --verbose flag, quiet library logs, and one-line errors."""

import contextlib
import sys
from typing import Iterator, NoReturn

from absl import flags
from absl import logging

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
    try:
        yield
    except UserError as e:
        if VERBOSE.value:
            raise
        fail(str(e))
