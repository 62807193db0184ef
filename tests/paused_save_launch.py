"""launch.stage_a, paused inside the save of one step; driven by test_resume.py and test_gcs.py.

  python tests/paused_save_launch.py STEP [launch.stage_a flags...]

The save of step STEP writes its files (into Orbax's temporary folder locally, into <STEP>/ on
gs://), prints `Paused in the save of step STEP`, and then never returns, so nothing commits: a
test SIGKILLs the run at that known point instead of racing a ~100 ms background write. The
pause is a Checkpointer whose `meta` item has a pausing handler, put in place of the library's
before the launcher starts; the library itself has no such hook.
"""

import dataclasses
import os
import runpy
import sys
import threading

import orbax.checkpoint as ocp

from muomni_jax.training import checkpointing


def command(step: int, *args: str) -> list[str]:
    """This wrapper's command line: launch.stage_a with args, paused in the save of `step`."""
    return [sys.executable, os.path.abspath(__file__), str(step), *args]


class PausingJsonHandler(ocp.JsonCheckpointHandler):
    """The `meta` item's handler: the save of `pause_step` stops after its files are written."""

    pause_step = -1

    async def async_save(self, directory, item=None, args=None):
        futures = await super().async_save(directory, item, args)
        if args is not None and args.item.get('step') == self.pause_step:
            for f in futures or []:
                f.result()  # meta is on disk, inside the uncommitted step.
            print(f'Paused in the save of step {self.pause_step}', flush=True)
            threading.Event().wait()
        return futures


@ocp.args.register_with_handler(PausingJsonHandler, for_save=True)
@dataclasses.dataclass
class PausingJsonSave(ocp.args.JsonSave):
    """JsonSave, saved by PausingJsonHandler."""


@ocp.args.register_with_handler(PausingJsonHandler, for_restore=True)
@dataclasses.dataclass
class PausingJsonRestore(ocp.args.JsonRestore):
    """JsonRestore, for PausingJsonHandler (Orbax wants both registered)."""


class PausingCheckpointer(checkpointing.Checkpointer):
    """The library's Checkpointer whose writable manager saves meta with PausingJsonHandler (a
    read-only one restores through the library's own, which reads the same files)."""

    meta_save_args = PausingJsonSave

    def _new_manager(self, options, writable):
        if not writable:
            return super()._new_manager(options, writable)
        handlers = {'state': ocp.StandardCheckpointHandler(), 'meta': PausingJsonHandler()}
        return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)


if __name__ == '__main__':
    PausingJsonHandler.pause_step = int(sys.argv[1])
    checkpointing.Checkpointer = PausingCheckpointer
    sys.argv = ['launch.stage_a', *sys.argv[2:]]
    runpy.run_module('launch.stage_a', run_name='__main__', alter_sys=True)
