"""Orbax step checkpoints of the whole training state, plus a small JSON of the data position.

Layout of save_dir/<step>/: `state/` (params, optimizer state, step, PRNG key) and `meta/`
(epoch and step within the epoch, so the data resumes without replay). A step that exists is
complete, and a save cut by a crash is never listed as a step and is removed when the next run
opens save_dir. Locally Orbax writes each step into `<step>.orbax-checkpoint-tmp-<time>` and
renames it on commit. On gs://, where a rename copies every object, it writes into `<step>/` and
commits by writing `<step>/commit_success.txt` last: a folder without it is an unfinished save.
"""

import errno
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from muomni_jax.errors import UserError, first_line
from muomni_jax.io import run_dir, storage
from muomni_jax.parallel import distributed
from muomni_jax.training import steps


class Checkpointer:
    """A CheckpointManager for one save_dir. Every process must call its methods together.

    It opens save_dir read-only, so restoring and every check that follows leave it untouched;
    `start_writing` switches to a writable manager once the run is known to be good.
    """

    # The save arguments of the `meta` item: they pick its Orbax handler.
    meta_save_args: type = ocp.args.JsonSave

    def __init__(self, directory: str, max_to_keep: int | None = None, read_only: bool = False):
        self.directory = storage.absolute(directory)
        self._max_to_keep = max_to_keep
        self._may_write = not read_only
        self._writing = False
        self._pending = None  # The step whose asynchronous save may still be writing.
        self._newest_intact = None  # The newest committed step of this run, once writing.
        self._failed = False
        self._manager = self._open(read_only=True)

    def _open(self, read_only: bool) -> ocp.CheckpointManager:
        # Orbax's own read_only mode logs warnings on every open; a manager that never saves and
        # neither creates nor cleans the folder writes nothing just the same.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else self._max_to_keep,
            create=not read_only,
            enable_async_checkpointing=not read_only,
            # A writable manager first deletes temporary folders left by interrupted saves.
            cleanup_tmp_directories=not read_only,
        )
        return self._new_manager(options, writable=not read_only)

    def _new_manager(
        self, options: ocp.CheckpointManagerOptions, writable: bool
    ) -> ocp.CheckpointManager:
        """The manager of state and meta, the same whether writable or not; a subclass may give
        a writable one's meta another handler (the tests pause a run inside a save so)."""
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
                storage.move_folder(
                    os.path.join(self.directory, str(s)),
                    os.path.join(self.directory, f'{s}.{suffix}'),
                )
            print(
                f'Warning: moved checkpoint steps {newer} in {self.directory} aside (renamed to '
                f'<step>.{suffix}), since training continues from step {start_step}.',
                file=sys.stderr,
            )
        if newer:  # Every process restored the same step (restore_latest), so has the same newer.
            distributed.barrier('checkpoints set aside')
        self._newest_intact = start_step if start_step in self.steps() else None
        self._manager.close()
        self._manager = self._open(read_only=False)
        self._writing = True

    @property
    def newest_intact(self) -> int | None:
        """The newest step known to be committed (None: no checkpoint yet)."""
        return self._newest_intact

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts an asynchronous save; the training loop continues while it writes. meta gets
        the checksum of every array of state, which restore verifies."""
        if not self._writing:
            raise RuntimeError('call start_writing before saving')
        meta = {
            **meta,
            'checksums': tree_checksums(state),
            'ema': isinstance(state, steps.AveragedTrainState),
        }
        # Orbax waits for the previous save before it starts this one: done here, a failure of
        # that save is reported as its own.
        self._finish_pending()
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=self.meta_save_args(meta)
                ),
                force=True,
            )
        except Exception as e:
            self._raise_failed(step, e)
        self._pending = step

    def _finish_pending(self) -> None:
        """Waits for the asynchronous save in flight, if any; raises SaveFailed if it failed."""
        if self._pending is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._raise_failed(self._pending, e)
        self._newest_intact, self._pending = self._pending, None

    def _raise_failed(self, step: int, error: Exception) -> None:
        """An I/O error as SaveFailed's one line; anything else (a bug) as it is."""
        self._failed, self._pending = True, None
        if not is_io_error(error):
            raise error
        raise write_failed(
            f'the checkpoint of step {step}', self.directory, error, self._newest_intact
        ) from error

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores onto the shardings carried by abstract_state (jax.ShapeDtypeStruct leaves).

        Raises DamagedCheckpoint when an array differs from the checksum its save recorded, or
        holds NaN/Inf (never saved so: the loop checks params before every save).
        """
        state, meta = self._read(step, abstract_state)
        verify(state, meta, f'step {step}')
        return _ema_as_wanted(state, abstract_state), meta

    def _read(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """The state as it was saved (with or without its average of the params, whatever
        abstract_state holds) and its meta."""
        meta = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta
        target = abstract_state
        if isinstance(abstract_state, steps.TrainState):
            saved_ema = isinstance(meta, dict) and bool(meta.get('ema'))
            # The average has the params' shapes and shardings.
            target = (
                steps.with_average(abstract_state, abstract_state.params)
                if saved_ema
                else steps.without_average(abstract_state)
            )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.meta

    def restore_latest(
        self, abstract_state: Any, step: int = 0
    ) -> tuple[Any, dict[str, Any]] | None:
        """Restores `step`, or else the newest step that restores, warning about any that do not.

        Returns None when save_dir holds no checkpoint.
        """
        steps = self.steps()
        if step:
            if step not in steps:
                raise UserError(
                    f'restore_step {step} is not in {self.directory}: available steps are '
                    f'{steps or "none"}'
                )
            restored, problem = self._restore_everywhere(step, abstract_state)
            if problem:
                raise UserError(
                    f'restore_step {step} in {self.directory} is unreadable '
                    f'({problem}): pick another of the steps {steps}'
                )
            return restored
        for candidate in reversed(steps):
            restored, problem = self._restore_everywhere(candidate, abstract_state)
            if not problem:
                return restored
            print(
                f'Warning: checkpoint step {candidate} in {self.directory} is unreadable '
                f'({problem}); trying an older one.',
                file=sys.stderr,
            )
        if steps:
            raise UserError(
                f'no checkpoint in {self.directory} could be restored (steps {steps}): '
                'move the folder aside to start afresh, or fix its files'
            )
        return None

    def _restore_everywhere(
        self, step: int, abstract_state: Any
    ) -> tuple[tuple[Any, dict[str, Any]] | None, str]:
        """(restored, '') when step restores on every process, else (None, what failed and
        where): the processes decide together, so all of them restore the same step."""
        restored, problem = None, ''
        try:
            restored = self._read(step, abstract_state)
        except Exception as e:
            problem = first_line(e, 200)
        problems = distributed.allgather_json(problem)
        failed = [i for i, p in enumerate(problems) if p]
        if failed:
            where = f' on process {failed[0]}' if len(problems) > 1 else ''
            return None, problems[failed[0]] + where
        # Only now that every process holds the arrays: the checksums are collectives over them,
        # and their values are global, so every process reaches the same verdict.
        try:
            verify(*restored, f'step {step}')
        except DamagedCheckpoint as e:
            return None, first_line(e, 200)
        return (_ema_as_wanted(restored[0], abstract_state), restored[1]), ''

    def wait(self) -> None:
        self._finish_pending()

    def close(self) -> None:
        """Waits for the save in flight and closes the manager. After a failed save (already
        raised) it closes without raising again."""
        try:
            if not self._failed:
                self._finish_pending()
        finally:
            try:
                self._manager.close()
            except Exception:
                if not self._failed:
                    raise


class SaveFailed(UserError):
    """A write to save_dir failed (a full disk, a lost mount, a refused gs:// write)."""


def write_failed(
    what: str, directory: str, error: BaseException, newest_intact: int | None
) -> SaveFailed:
    """The one line for a write of a run that failed: what, the cause, the newest intact
    checkpoint and what to do."""
    code, cause = io_error_cause(error)
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = f'free space in {directory}'
    elif storage.is_url(directory):
        fix = f'check that this machine may write to {directory}'
    else:
        fix = f'check that {directory} is still mounted and writable'
    if newest_intact is None:
        then = f'no checkpoint of this run is intact yet: {fix}; rerun to start again'
    else:
        then = (
            f'the newest intact checkpoint is step {newest_intact}: {fix}; rerun to '
            f'continue from step {newest_intact}'
        )
    return SaveFailed(f'{what} could not be written ({cause}); {then}')


# TensorStore's status codes for a failed read or write (its errors are ValueErrors).
_STORAGE_STATUS = re.compile(
    r'^(RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNAVAILABLE|NOT_FOUND|'
    r'DEADLINE_EXCEEDED|ABORTED|DATA_LOSS|UNAUTHENTICATED|'
    r'FAILED_PRECONDITION|UNKNOWN): '
)


def is_io_error(error: BaseException) -> bool:
    """Whether the exception chain holds a storage failure (OSError, a TensorStore status, a
    Google Cloud API error) rather than a bug."""
    seen = error
    while seen is not None:
        if (
            isinstance(seen, OSError)
            or _STORAGE_STATUS.match(str(seen))
            or type(seen).__module__.startswith('google.')
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def io_error_cause(error: BaseException) -> tuple[int | None, str]:
    """(errno or None, the cause in words) of an I/O failure: the OS error wherever it sits in
    the exception chain, or as TensorStore quotes it (os_error_code='28'), else the error's
    first line."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno, os.strerror(seen.errno)
        match = re.search(r"os_error_code='?(\d+)", str(seen))
        if match:
            return int(match.group(1)), os.strerror(int(match.group(1)))
        seen = seen.__cause__ or seen.__context__
    return None, first_line(error, 200)


def _ema_as_wanted(state: Any, abstract_state: Any) -> Any:
    """The restored state with an average of the params exactly when abstract_state has one: a
    run that turns ema_decay on over a checkpoint without it starts the average at the
    restored params; one that turns it off drops it."""
    if not isinstance(state, steps.TrainState):
        return state
    wanted = isinstance(abstract_state, steps.AveragedTrainState)
    has = isinstance(state, steps.AveragedTrainState)
    if wanted and not has:
        return steps.with_average(state, steps.copy_tree(state.params))
    if has and not wanted:
        return steps.without_average(state)
    return state


class DamagedCheckpoint(ValueError):
    """A step whose arrays restore but are not what was saved."""


@jax.jit
def _checksums(leaves: list[jax.Array]) -> jax.Array:
    """(N, 2) uint32: per array, the sum of its elements' bits and the sum weighted by each
    element's position, both modulo 2**32. Integer sums are exact in any order, so the value
    does not depend on the mesh the array is sharded over; the weighted one also sees swaps."""

    def one(x):
        bits = (
            jax.lax.bitcast_convert_type(x, jnp.uint32)
            if x.dtype.itemsize == 4
            else x.astype(jnp.uint32)
        )
        position = jnp.arange(1, bits.size + 1, dtype=jnp.uint32).reshape(bits.shape)
        return jnp.stack(
            [jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * position, dtype=jnp.uint32)]
        )

    return jnp.stack([one(x) for x in leaves])


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(
        jnp.array(
            [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
        )
    )


def _array_leaves(tree: Any) -> tuple[list[str], list[jax.Array]]:
    pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(path) for path, _ in pairs], [leaf for _, leaf in pairs]


def tree_checksums(tree: Any) -> dict[str, list[int]]:
    """{leaf path: [sum, weighted sum]} of every array of the tree (one device pass, a few bytes
    to the host)."""
    names, leaves = _array_leaves(tree)
    values = jax.device_get(_checksums(leaves)).tolist() if leaves else []
    return dict(zip(names, values))


def verify(state: Any, meta: dict[str, Any], what: str) -> None:
    """Raises DamagedCheckpoint if a restored array differs from its recorded checksum (steps
    saved before checksums existed have none to check) or is not finite."""
    saved = meta.get('checksums') if isinstance(meta, dict) else None
    names, leaves = _array_leaves(state)
    if saved is not None:
        found = tree_checksums(state)
        wrong = [name for name in names if found.get(name) != saved.get(name)]
        if wrong:
            raise DamagedCheckpoint(
                f'{what}: {len(wrong)} array(s) differ from the checksums '
                f'of their save, first {wrong[0]}'
            )
    if leaves and not bool(_all_finite(leaves)):
        raise DamagedCheckpoint(f'{what}: it holds NaN/Inf values, which no save writes')


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings
    )


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
    checkpointer.save(0, state, {'step': 0, 'epoch': 0, 'step_in_epoch': 0, 'steps_per_epoch': 0})
    checkpointer.close()
    run_dir.write_config(save_dir, config.to_dict())


def check_resumable(meta: dict, directory: str, mixture: str, steps_per_epoch: int) -> None:
    """A checkpoint past step 0 resumes only onto the data position it was saved with: the same
    mixture and the same steps per epoch. (Step 0, an imported checkpoint (launch.convert), has no
    data position to keep.)"""
    start_step = int(meta['step'])
    if start_step and meta.get('mixture') != mixture:
        raise UserError(
            f'the checkpoint in {directory} was trained on '
            f'{meta.get("mixture") or "a single data_path"}, not on '
            f'{mixture or "a single data_path"}: resume with '
            'the same --config.mixture, or use a new save_dir'
        )
    if start_step and meta.get('steps_per_epoch') != steps_per_epoch:
        raise UserError(
            f'the checkpoint in {directory} was trained with '
            f'{meta.get("steps_per_epoch")} steps per epoch, this data and '
            f'batch_size give {steps_per_epoch}: '
            'resume with the same data, batch_size and data_shards (0 means one '
            'per process), or use a new save_dir'
        )
