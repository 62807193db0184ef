"""A launcher (launch.prepare_data, launch.stage_a) whose token cache build pauses once it has
written its first chunk of tokens; driven by test_token_cache.py and test_reliability.py.

  python tests/paused_cache_build.py PAUSED_FILE MODULE [flags...]

After the first chunk with tokens is written (its shards' files are partial, none has a header),
the run creates PAUSED_FILE and sleeps until it is killed: a test kills it mid-build at a known
point instead of racing a timer. The patch is made here, before the launcher runs; the library
holds no hook for it.
"""

import runpy
import sys
import time

from muomni_jax.data import token_cache

PAUSED_FILE = sys.argv[1]
MODULE = sys.argv[2]
_real_write = token_cache._write


def _write(writers, progress, future, done):
    _real_write(writers, progress, future, done)
    if any(len(ids) for ids, _, _ in future.result().values()):
        with open(PAUSED_FILE, 'a', encoding='utf-8'):  # Made if missing; never truncated.
            pass
        while True:
            time.sleep(60)


token_cache._write = _write
sys.argv = [MODULE, *sys.argv[3:]]
runpy.run_module(MODULE, run_name='__main__', alter_sys=True)
