"""The test process's set-up: eight virtual CPU devices, so every test also exercises sharding,
a token cache and a compilation cache of the session's own. Done on import, which
tests/conftest.py does before any test or fixture runs: the device count must be fixed before
JAX first touches a backend (importing jax or muomni_jax does not)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The default token cache (~/.cache/...) of every run the tests start, in-process or not: shared
# by the tests, so a corpus is tokenized once per session, and never the user's own cache.
os.environ['XDG_CACHE_HOME'] = tempfile.mkdtemp(prefix='muomni-test-cache-')
atexit.register(shutil.rmtree, os.environ['XDG_CACHE_HOME'], ignore_errors=True)
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()

import jax  # noqa: E402  (after XLA_FLAGS)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(REPO, 'data', 'text', 'corpus.txt')

# One persistent compilation cache for this session, in-process and in every launcher subprocess:
# the tests compile the same tiny train and eval steps many times. Fresh per session, so a run's
# time never depends on an earlier one.
COMPILATION_CACHE = tempfile.mkdtemp(prefix='muomni_jax_test_cache_')
atexit.register(shutil.rmtree, COMPILATION_CACHE, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', COMPILATION_CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
