"""The device mesh and how arrays are laid out on it.

Axes: 'data' (batch only) and 'fsdp' (batch, and the large parameter and optimizer matrices).
Parameters are sharded by shape alone, so Adam's moments inherit their parameter's layout and a
checkpoint restores onto any mesh: the layout is recomputed from the shapes, never saved.
"""

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from muomni_jax.errors import UserError

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')
# Vectors and small matrices are cheaper to replicate than to gather.
_MIN_SHARDED_SIZE = 2**14


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
    """Resolves {'data': -1, 'fsdp': 2}-style sizes; at most one -1 takes the devices left over."""
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    fill = [i for i, size in enumerate(sizes) if size == -1]
    if len(fill) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise UserError(
            f'mesh {dict(zip(MESH_AXES, sizes))} is invalid: give each axis a '
            'positive size, with at most one -1 to fill'
        )
    known = math.prod(size for size in sizes if size != -1)
    if fill:
        if num_devices % known:
            raise UserError(
                f'mesh {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} '
                f'devices: the fixed axes ({known}) must divide the device count'
            )
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise UserError(
            f'mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices but '
            f'{num_devices} are present: set one axis to -1'
        )
    return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config, len(devices))
    # Auto axes: jit places the collectives from the in/out shardings we give it.
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def _spec_for(shape: tuple[int, ...], fsdp: int) -> P:
    """Shards the largest axis divisible by the fsdp size; everything else replicates."""
    if fsdp == 1 or len(shape) < 2 or math.prod(shape) < _MIN_SHARDED_SIZE:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = 'fsdp'
            return P(*spec)
    return P()


def state_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
    """NamedShardings for every array leaf of a (params, optimizer state, ...) tree."""
    fsdp = mesh.shape['fsdp']
    return jax.tree.map(
        lambda x: NamedSharding(mesh, _spec_for(tuple(x.shape), fsdp)), abstract_tree
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch rows split over every device; the sequence axis stays whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(
    batch_size: int, mesh: Mesh, accumulation_steps: int, this_process_feeds: bool = True
) -> None:
    """Every micro-batch must split evenly over the devices, hence over the processes too.

    Process p feeds the rows of its own devices, batch_size * local devices / devices of them,
    so a batch that divides over the devices also divides over the processes.
    this_process_feeds=False: a compile for another machine's devices (launch.preflight),
    which this process does not feed.
    """
    shards = mesh.shape['data'] * mesh.shape['fsdp']
    if batch_size % accumulation_steps:
        raise UserError(
            f'batch_size ({batch_size}) must be divisible by '
            f'gradient_accumulation_steps ({accumulation_steps}): change one of them'
        )
    micro = batch_size // accumulation_steps
    if micro % shards:
        where = f'{shards} devices'
        if jax.process_count() > 1:
            where += f' ({jax.process_count()} processes)'
        raise UserError(
            f'the micro-batch ({micro} = batch_size / gradient_accumulation_steps) '
            f"must split evenly over the mesh's {where}: use a batch_size of "
            f'{accumulation_steps} x a multiple of {shards}'
        )
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    if this_process_feeds and local_devices * jax.process_count() != shards:
        raise UserError(
            f'the mesh gives this process {local_devices} of its {shards} devices; '
            'every process must own the same number: build the mesh over all '
            'devices'
        )


def global_batch(
    local_batch: dict[str, np.ndarray], sharding: NamedSharding
) -> dict[str, jax.Array]:
    """Assembles each process's rows into one global, sharded batch.

    Args:
      local_batch: (B / process_count, T) arrays: the rows of this process's devices.
    Returns:
      (B, T) arrays laid out by `sharding`.
    """
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
