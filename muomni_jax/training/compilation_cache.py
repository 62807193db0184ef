"""JAX's persistent compilation cache: a resumed run loads its compiled steps instead of compiling.

On a preemptible VM every restart would otherwise pay the full compile of the train and eval
steps again. The cache lives beside the token cache, in $XDG_CACHE_HOME/muomni_jax/
jax_compilation_cache (~/.cache/...), unless the run's compilation_cache_dir or the
JAX_COMPILATION_CACHE_DIR environment variable names another place; compilation_cache = False
turns it off. JAX keys each entry by the computation, the devices and the JAX version,
so a stale entry is never used.
"""

import os

import jax


def default_dir() -> str:
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'muomni_jax', 'jax_compilation_cache')


def enable(enabled: bool, directory: str = '') -> str | None:
    """Points JAX's persistent cache at `directory` ('': JAX's setting, else default_dir());
    returns it (None: off).

    Must run before the first compilation of the process.
    """
    if not enabled:
        jax.config.update('jax_enable_compilation_cache', False)
        return None
    # JAX_COMPILATION_CACHE_DIR in the environment sets jax_compilation_cache_dir at import.
    path = directory or jax.config.jax_compilation_cache_dir or default_dir()
    jax.config.update('jax_enable_compilation_cache', True)
    jax.config.update('jax_compilation_cache_dir', path)
    return path
