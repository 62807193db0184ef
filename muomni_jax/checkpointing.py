"""Orbax step checkpoints of the whole training state, plus a small JSON of the data position.

Layout of save_dir/<step>/: `state/` (params, optimizer state, step, PRNG key) and `meta/`
(epoch and step within the epoch, so the data resumes without replay). Orbax writes each step
into a temporary folder and renames it on commit, so a step folder that exists is complete.
"""

import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from muomni_jax.errors import UserError


class Checkpointer:
  """A CheckpointManager for one save_dir. Every process must call save/restore together."""

  def __init__(self, directory: str, max_to_keep: int | None = None, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=not read_only)
    # Orbax needs absolute local paths; remote ones (gs://...) are absolute already.
    self.directory = directory if '://' in directory else os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts an asynchronous save; the training loop continues while it writes."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores onto the shardings carried by abstract_state (jax.ShapeDtypeStruct leaves)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def restore_latest(self, abstract_state: Any, step: int = 0) -> tuple[Any, dict[str, Any]] | None:
    """Restores `step`, or else the newest step that restores, warning about any that do not.

    Returns None when save_dir holds no checkpoint.
    """
    steps = self.steps()
    if step:
      if step not in steps:
        raise UserError(f'restore_step {step} is not in {self.directory}: available steps are '
                        f'{steps or "none"}')
      return self.restore(step, abstract_state)
    for candidate in reversed(steps):
      try:
        return self.restore(candidate, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        print(f'Warning: checkpoint step {candidate} in {self.directory} is unreadable '
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
