"""Train states read back from a run's save_dir."""

import os

import jax
import numpy as np

from muomni_jax.parallel import partitioning
from muomni_jax.training import checkpointing, run_plan, steps


def one_device_mesh():
    return partitioning.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])


def saved_state(save_dir, step):
    """The train state of save_dir/<step> exactly as saved, as host arrays, read without a
    target tree (so without this code's idea of its structure)."""
    import warnings

    import orbax.checkpoint as ocp

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # Orbax warns that it reads the shardings from the files.
        with ocp.PyTreeCheckpointer() as checkpointer:
            state = checkpointer.restore(os.path.join(str(save_dir), str(step), 'state'))
    return jax.tree.map(np.asarray, state)


def restore_state(config, save_dir, step, mesh=None):
    """The whole train state of save_dir/<step>, on `mesh` (default one device)."""
    setup = steps.make_train_setup(
        run_plan.resolve(config), mesh or one_device_mesh(), 1, initialize=False
    )
    checkpointer = checkpointing.Checkpointer(str(save_dir), read_only=True)
    state, _ = checkpointer.restore(step, setup.abstract_state)
    checkpointer.close()
    return state
