"""Named accelerators to compile for without having them: Cloud TPU slices by their Cloud names
(`v5e-256`, `v4-32`, ...) and NVIDIA GPU boxes (`h100x8`), as abstract devices from
jax.experimental.topologies, with each chip's published figures for a roofline.

Compiling needs the target's compiler in this process: libtpu for TPUs, the CUDA plugin (with
nvcc, nvjitlink and cuDNN) for GPUs. launch.preflight puts them on the path
(requirements-preflight.txt); nothing else imports this module.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from muomni_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's published figures (dense bf16; bytes and bytes/s)."""

    kind: str
    platform: str  # 'tpu' or 'gpu'
    peak_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    interconnect_bandwidth: float  # Per chip, both directions: ICI, or NVLink within a host.
    chips_per_host: int
    source: str


_GB, _GIB, _TB = 1e9, 2**30, 1e12
# TPU figures from Google's Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4,
# /v5e, /v5p-training, /v6e), read 2026-12-05; GPU figures from NVIDIA's datasheets, except
# the A100's and H100's memory: what their drivers report (XLA's target configs, gpu_targets/),
# a little under the 80 GB on the box.
CHIPS = {
    'v4': Chip(
        'TPU v4',
        'tpu',
        275e12,
        32 * _GIB,
        1200 * _GB,
        # The page gives no per-chip ICI figure: its all-reduce bandwidth per Pod,
        # 1.1 PB/s, over the Pod's 4,096 chips.
        1.1e15 / 4096,
        4,
        'cloud.google.com/tpu/docs/v4: 275 TFLOP/s, 32 GiB HBM2 at 1,200 GB/s; ICI from '
        'the Pod all-reduce bandwidth / 4,096 chips',
    ),
    'v5e': Chip(
        'TPU v5 lite',
        'tpu',
        197e12,
        16 * _GIB,
        819 * _GB,
        400 * _GB,
        8,
        'cloud.google.com/tpu/docs/v5e: 197 TFLOP/s, 16 GiB HBM at 819 GB/s, ICI '
        '400 GB/s, 8 chips per host',
    ),
    'v5p': Chip(
        'TPU v5p',
        'tpu',
        459e12,
        95 * _GIB,
        2765 * _GB,
        1200 * _GB,
        4,
        'cloud.google.com/tpu/docs/v5p-training: 459 TFLOP/s, 95 GiB HBM at 2,765 GB/s, '
        'ICI 1,200 GB/s, 4 chips per VM',
    ),
    'v6e': Chip(
        'TPU v6 lite',
        'tpu',
        918e12,
        32 * _GB,
        1638 * _GB,
        800 * _GB,
        8,
        'cloud.google.com/tpu/docs/v6e: 918 TFLOP/s, 32 GB HBM at 1,638 GB/s, ICI '
        '800 GB/s, 8 chips per host',
    ),
    'a100': Chip(
        'NVIDIA A100-SXM4-80GB',
        'gpu',
        312e12,
        85_100_068_864,
        2.039 * _TB,
        600 * _GB,
        8,
        'NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOP/s bf16 dense, 80 GB HBM2e at '
        '2,039 GB/s, NVLink 600 GB/s',
    ),
    'h100': Chip(
        'NVIDIA H100 80GB HBM3',
        'gpu',
        989e12,
        84_942_979_072,
        3.35 * _TB,
        900 * _GB,
        8,
        'NVIDIA H100 datasheet (SXM5): 989 TFLOP/s bf16 dense, 80 GB HBM3 at 3.35 TB/s, '
        'NVLink 900 GB/s',
    ),
    'h200': Chip(
        'NVIDIA H200 141GB HBM3e',
        'gpu',
        989e12,
        141 * _GB,
        4.8 * _TB,
        900 * _GB,
        8,
        'NVIDIA H200 datasheet (SXM): 989 TFLOP/s bf16 dense, 141 GB HBM3e at 4.8 TB/s, '
        'NVLink 900 GB/s',
    ),
}
_GPU_SPECS = {'a100': 'a100_sxm_80.txtpb', 'h100': 'h100_sxm.txtpb', 'h200': 'h200_sxm.txtpb'}
# v4 and v5p count TensorCores in their names (2 per chip): v4-32 is 16 chips. Their slices are
# 3D; v5e and v6e slices are 2D and named by chips.
_CORES_PER_CHIP = {'v4': 2, 'v5p': 2, 'v5e': 1, 'v6e': 1}
_TOPOLOGY_3D = {
    4: '2x2x1',
    8: '2x2x2',
    16: '2x2x4',
    32: '2x4x4',
    64: '4x4x4',
    128: '4x4x8',
    256: '4x8x8',
    512: '8x8x8',
    1024: '8x8x16',
    2048: '8x16x16',
    4096: '16x16x16',
}
_TOPOLOGY_2D = {
    1: '1x1',
    4: '2x2',
    8: '2x4',
    16: '4x4',
    32: '4x8',
    64: '8x8',
    128: '8x16',
    256: '16x16',
}
EXAMPLES = 'v5e-256, v4-32, v5p-128, v6e-64, h100x8, a100x1, h200x16'


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    chip: Chip
    chips: int
    hosts: int
    topology: str  # get_topology_desc's: 'v5e:16x16', or '1x2x8' (slices x hosts x GPUs).

    @property
    def platform(self) -> str:
        return self.chip.platform


def parse(name: str) -> Target:
    """'v5e-256' or 'h100x8' -> its Target; one line naming the known forms otherwise."""
    tpu = re.fullmatch(r'(v4|v5e|v5p|v6e)-(\d+)', name)
    gpu = re.fullmatch(r'(a100|h100|h200)x(\d+)', name)
    if tpu:
        generation, count = tpu.group(1), int(tpu.group(2))
        chip = CHIPS[generation]
        chips, remainder = divmod(count, _CORES_PER_CHIP[generation])
        shapes = _TOPOLOGY_3D if generation in ('v4', 'v5p') else _TOPOLOGY_2D
        if remainder or chips not in shapes:
            sizes = ', '.join(f'{generation}-{c * _CORES_PER_CHIP[generation]}' for c in shapes)
            raise UserError(
                f'target {name} is not a {generation} slice this knows: use one of {sizes}'
            )
        hosts = max(1, chips // chip.chips_per_host)
        return Target(name, chip, chips, hosts, f'{generation}:{shapes[chips]}')
    if gpu:
        chip, count = CHIPS[gpu.group(1)], int(gpu.group(2))
        if count < 1 or (count > chip.chips_per_host and count % chip.chips_per_host):
            raise UserError(
                f'target {name}: use 1 to {chip.chips_per_host} GPUs, or a multiple '
                f'of {chip.chips_per_host} (whole hosts)'
            )
        hosts = math.ceil(count / chip.chips_per_host)
        return Target(name, chip, count, hosts, f'1x{hosts}x{count // hosts}')
    raise UserError(
        f'unknown target {name!r}: name a Cloud TPU slice (v4-N, v5e-N, v5p-N, '
        f'v6e-N) or GPUs (a100xN, h100xN, h200xN), e.g. {EXAMPLES}'
    )


def gpu_target_config(target: Target) -> str:
    """The GpuTargetConfigProto text of a GPU target (gpu_targets/, with its source)."""
    generation = next(g for g, chip in CHIPS.items() if chip is target.chip)
    path = os.path.join(os.path.dirname(__file__), 'gpu_targets', _GPU_SPECS[generation])
    with open(path, encoding='utf-8') as f:
        return f.read()


def devices(target: Target) -> list:
    """The target's abstract devices (one per chip), in the order of their ids."""
    from jax.experimental import topologies

    try:
        if target.platform == 'tpu':
            kwargs = {}
            if target.topology.startswith(('v4:', 'v5p:')):
                # One device per chip ("megacore"), as meshes over v4 and v5p need.
                kwargs = dict(chip_config_name='megacore', chips_per_host_bounds=(2, 2, 1))
            elif target.chips > target.chip.chips_per_host:
                kwargs = dict(chips_per_host_bounds=(2, 4, 1))
            elif target.chips == 1:
                kwargs = dict(chips_per_host_bounds=(1, 1, 1))
            topology = topologies.get_topology_desc(
                platform='tpu', topology_name=target.topology, **kwargs
            )
        else:
            topology = topologies.get_topology_desc(
                platform='cuda',
                topology_name='',
                target_config=gpu_target_config(target),
                topology=target.topology,
            )
    except (RuntimeError, ValueError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fix = (
            missing_compiler(target)
            if re.search(
                r'backend|plugin|install|not found|not implemented|libtpu|cuda',
                message,
                re.IGNORECASE,
            )
            else 'please report it with this line'
        )
        raise UserError(
            f"cannot describe {target.name}'s devices ({message[:300]}): {fix}"
        ) from None
    return sorted(topology.devices, key=lambda d: d.id)


def missing_compiler(target: Target) -> str:
    what = 'libtpu' if target.platform == 'tpu' else 'the CUDA plugin, nvcc, nvjitlink and cuDNN'
    return (
        f'is {what} installed? pip install --no-deps --target .compilers -r '
        'requirements-preflight.txt (launch.preflight reads .compilers, or --compilers)'
    )
