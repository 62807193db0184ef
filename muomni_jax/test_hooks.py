"""Hooks that let the tests stop a run at an exact point (inside a save, inside a cache build)
instead of racing a timer. Each is named by its own environment variable, and takes effect only
where MUOMNI_ENABLE_TEST_HOOKS=1 is set too, which only tests/conftest.py sets: a stray
variable in a user's shell can never hang or damage a run.
"""

import os

ENABLE_ENV = 'MUOMNI_ENABLE_TEST_HOOKS'


def value(name: str) -> str | None:
    """The hook variable's value, or None when it is unset or the hooks are not enabled."""
    if os.environ.get(ENABLE_ENV) != '1':
        return None
    return os.environ.get(name) or None
