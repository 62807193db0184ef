"""launch.stage_a, held before one step until it has handled some signals, or until a file
exists; driven by test_resume.py and test_reliability.py.

  python tests/held_launch.py STEP SIGNALS [launch.stage_a flags...]
  python tests/held_launch.py STEP until=PATH [launch.stage_a flags...]

Before the batch of step STEP reaches the train step, the run prints `Holding before step STEP`
and waits, polling every 50 ms, until its own signal handler (preemption.StopSignals) has run
SIGNALS times, or until PATH exists; then it goes on as launch.stage_a does. A test can so
signal the run, or change its disk, at a known step however fast or loaded the machine is,
instead of racing the steps that are left. With more SIGNALS than the test sends, the run holds
there until it is killed.
"""

import os
import runpy
import sys
import time

from muomni_jax.training import periodic_actions, preemption

HOLD_STEP = int(sys.argv[1])
RELEASE_FILE = sys.argv[2][len('until=') :] if sys.argv[2].startswith('until=') else None
SIGNALS = 0 if RELEASE_FILE else int(sys.argv[2])
_handled = []

_real_handle = preemption.StopSignals._handle
_real_train_loop = periodic_actions.train_loop


def _handle(self, signum, frame):
    _handled.append(signum)  # Before the real handler, which raises on a second signal.
    _real_handle(self, signum, frame)


def _train_loop(state, step_numbers, batches, *args, **kwargs):
    def held_batches():
        for step, batch in zip(step_numbers, batches):
            if step == HOLD_STEP:
                print(f'Holding before step {step}', flush=True)
                while len(_handled) < SIGNALS or (
                    RELEASE_FILE and not os.path.exists(RELEASE_FILE)
                ):
                    time.sleep(0.05)
            yield batch

    return _real_train_loop(state, step_numbers, held_batches(), *args, **kwargs)


preemption.StopSignals._handle = _handle
periodic_actions.train_loop = _train_loop
sys.argv = ['launch.stage_a', *sys.argv[3:]]
runpy.run_module('launch.stage_a', run_name='__main__', alter_sys=True)
