"""Orbax step checkpoints of the whole training state, plus a small JSON of the data position.

Layout of save_dir/<step>/: `state/` (params, optimizer state, step, PRNG key) and `meta/`
(epoch and step within the epoch, so the data resumes without replay). A step that exists is
complete, and a save cut by a crash is never listed as a step and is removed when the next run
opens save_dir. Locally Orbax writes each step into `<step>.orbax-checkpoint-tmp-<time>` and
renames it on commit. On gs://, where a rename copies every object, it writes into `<step>/` and
commits by writing `<step>/commit_success.txt` last: a folder without it is an unfinished save.
"""

import dataclasses
import os
import sys
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from muomni_jax.errors import UserError
from muomni_jax.io import storage
from muomni_jax.io.atomic_write import write_atomically


# Tests only: with MUOMNI_PAUSE_IN_SAVE_OF_STEP=N the save of step N writes into Orbax's temporary
# folder, prints a line, and then never returns, so nothing commits: tests/test_resume.py SIGKILLs
# the run at that known point instead of racing a ~100 ms background write.
PAUSE_IN_SAVE_ENV = 'MUOMNI_PAUSE_IN_SAVE_OF_STEP'


class _PausingJsonHandler(ocp.JsonCheckpointHandler):
    """The `meta` item's handler when PAUSE_IN_SAVE_ENV is set."""

    def __init__(self):
        super().__init__()
        self._pause_step = int(os.environ.get(PAUSE_IN_SAVE_ENV, '-1'))

    async def async_save(self, directory, item=None, args=None):
        futures = await super().async_save(directory, item, args)
        if args is not None and args.item.get('step') == self._pause_step:
            for f in futures or []:
                f.result()  # meta is on disk inside the temporary folder.
            print(f'Paused in the save of step {self._pause_step} ({PAUSE_IN_SAVE_ENV})',
                  flush=True)
            threading.Event().wait()
        return futures


@ocp.args.register_with_handler(_PausingJsonHandler, for_save=True)
@dataclasses.dataclass
class _PausingJsonSave(ocp.args.JsonSave):
    """JsonSave, saved by _PausingJsonHandler."""


@ocp.args.register_with_handler(_PausingJsonHandler, for_restore=True)
@dataclasses.dataclass
class _PausingJsonRestore(ocp.args.JsonRestore):
    """JsonRestore, for _PausingJsonHandler (Orbax wants both registered)."""


class Checkpointer:
    """A CheckpointManager for one save_dir. Every process must call its methods together.

  It opens save_dir read-only, so restoring and every check that follows leave it untouched;
  `start_writing` switches to a writable manager once the run is known to be good.
  """

    def __init__(self, directory: str, max_to_keep: int | None = None, read_only: bool = False):
        self.directory = storage.absolute(directory)
        self._max_to_keep = max_to_keep
        self._may_write = not read_only
        self._writing = False
        self._manager = self._open(read_only=True)

    def _open(self, read_only: bool) -> ocp.CheckpointManager:
        # Orbax's own read_only mode logs warnings on every open; a manager that never saves and
        # neither creates nor cleans the folder writes nothing just the same.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else self._max_to_keep,
            create=not read_only,
            enable_async_checkpointing=not read_only,
            # A writable manager first deletes temporary folders left by interrupted saves.
            cleanup_tmp_directories=not read_only)
        pause_step = os.environ.get(PAUSE_IN_SAVE_ENV)
        self._meta_save = ocp.args.JsonSave
        if pause_step and not read_only:
            self._meta_save = _PausingJsonSave
            handlers = {'state': ocp.StandardCheckpointHandler(),
                        'meta': _PausingJsonHandler()}
            return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        return ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))

    def start_writing(self, start_step: int) -> None:
        """Opens save_dir for saving a run that continues from `start_step` (0: a fresh run).

    Steps newer than start_step (unreadable ones, or ones past --config.restore_step) would be
    written again, so they are renamed to `<step>.set-aside-<time>`, out of Orbax's sight, and
    kept for inspection rather than deleted.
    """
        if not self._may_write:
            raise ValueError(f'{self.directory} was opened read-only')
        newer = [s for s in self.steps() if s > start_step]
        if newer and jax.process_index() == 0:
            suffix = f'set-aside-{int(time.time())}'
            for s in newer:
                storage.move_folder(os.path.join(self.directory, str(s)),
                                    os.path.join(self.directory, f'{s}.{suffix}'))
            print(
                f'Warning: moved checkpoint steps {newer} in {self.directory} aside (renamed to '
                f'<step>.{suffix}), since training continues from step {start_step}.',
                file=sys.stderr)
        if newer:
            multihost_utils.sync_global_devices('muomni_jax: checkpoints set aside')
        self._manager.close()
        self._manager = self._open(read_only=False)
        self._writing = True

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts an asynchronous save; the training loop continues while it writes."""
        if not self._writing:
            raise RuntimeError('call start_writing before saving')
        self._manager.save(step,
                           args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=self._meta_save(meta)),
                           force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores onto the shardings carried by abstract_state (jax.ShapeDtypeStruct leaves)."""
        restored = self._manager.restore(step,
                                         args=ocp.args.Composite(
                                             state=ocp.args.StandardRestore(abstract_state),
                                             meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def restore_latest(self,
                       abstract_state: Any,
                       step: int = 0) -> tuple[Any, dict[str, Any]] | None:
        """Restores `step`, or else the newest step that restores, warning about any that do not.

    Returns None when save_dir holds no checkpoint.
    """
        steps = self.steps()
        if step:
            if step not in steps:
                raise UserError(
                    f'restore_step {step} is not in {self.directory}: available steps are '
                    f'{steps or "none"}')
            return self.restore(step, abstract_state)
        for candidate in reversed(steps):
            try:
                return self.restore(candidate, abstract_state)
            except Exception as e:  # pylint: disable=broad-except
                print(
                    f'Warning: checkpoint step {candidate} in {self.directory} is unreadable '
                    f'({type(e).__name__}: {str(e).splitlines()[0][:200]}); trying an older one.',
                    file=sys.stderr)
        if steps:
            raise UserError(f'no checkpoint in {self.directory} could be restored (steps {steps}): '
                            'move the folder aside to start afresh, or fix its files')
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_tree, shardings)


def check_new_save_dir(save_dir: str) -> None:
    """Refuses a save_dir that holds anything: step 0 of an import must not mix with a run."""
    if epath.Path(save_dir).exists() and any(epath.Path(save_dir).iterdir()):
        raise UserError(f'save_dir {save_dir} is not empty: import into a new folder')


def write_step_zero(save_dir: str, state: Any, config: Any) -> None:
    """Makes a new save_dir holding `state` as step 0 (no data position yet) and config.json:
    a run that launch.stage_a continues and that launch.sample and launch.evaluate read."""
    check_new_save_dir(save_dir)
    checkpointer = Checkpointer(save_dir, max_to_keep=None)
    checkpointer.start_writing(0)
    checkpointer.save(0, state, {'step': 0, 'epoch': 0, 'step_in_epoch': 0,
                                 'steps_per_epoch': 0})
    checkpointer.close()
    write_atomically(os.path.join(save_dir, 'config.json'),
                     config.to_json_best_effort(indent=1, sort_keys=True))
