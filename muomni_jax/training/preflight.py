"""Will this config fit, and how fast can it go, on accelerators this machine does not have?

`check(config, target)` compiles the run's real train_step and eval_step (its mesh, shardings,
accumulation and attention kernel) for a named target's abstract devices
(parallel.compile_targets) and reads the executable: memory per device against the chip's, the
compiler's FLOPs beside model/flops.py's count, the bytes its collectives move, the attention
kernel it holds (custom-call names), the compile time, and a roofline floor on the step time.
The floor is a bound from published peaks, not a measurement.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from muomni_jax.errors import UserError
from muomni_jax.model import flops
from muomni_jax.parallel import compile_targets, partitioning
from muomni_jax.training import config_checks, run_plan, steps

# A compiled step may use at most this share of the chip's memory: the runtime, the input
# pipeline's buffers and fragmentation take the rest.
FIT_FRACTION = 0.9
_COLLECTIVE = re.compile(
    r'=\s*(\(.*?\)|\S+)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|'
    r'collective-permute)(?:-start)?\('
)
_ARRAY = re.compile(r'(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([\d,]*)\]')
_BYTES = {
    'pred': 1,
    's8': 1,
    'u8': 1,
    's16': 2,
    'u16': 2,
    'f16': 2,
    'bf16': 2,
    's32': 4,
    'u32': 4,
    'f32': 4,
    's64': 8,
    'u64': 8,
    'f64': 8,
}
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
# The custom calls that are attention kernels, and what they are.
KERNEL_CALLS = {
    'tpu_custom_call': 'Mosaic (splash)',
    '__gpu$xla.gpu.triton': 'Triton (pallas)',
    '__cudnn$fmha': 'cuDNN fused attention',
}


def abstract_batch(plan: run_plan.RunPlan, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The (B, T) global batch a step takes, as ShapeDtypeStructs laid out as the run lays it."""
    sharding = partitioning.batch_sharding(mesh)
    shape = (plan.step.batch_size, plan.model.ctx_len)
    batch = {
        name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
        for name in ('inputs', 'targets', 'segment_ids', 'positions')
    }
    batch['weights'] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    return batch


def _array_bytes(text: str) -> list[tuple[int, tuple[int, ...]]]:
    """(bytes, shape) of every array in an HLO shape text such as '(bf16[8,512]{1,0}, f32[])'."""
    out = []
    for dtype, dims in _ARRAY.findall(text):
        shape = tuple(int(d) for d in dims.split(',') if d)
        out.append((_BYTES[dtype] * math.prod(shape), shape))
    return out


def collectives(hlo: str) -> dict[str, dict[str, Any]]:
    """{op: {'count', 'bytes', 'shapes'}} of the collectives in an executable's HLO text, each
    counted by the arrays it produces per device. An op in a loop (the accumulation scan, the
    chunked loss, scanned layers) is counted once, not once per trip."""
    found: dict[str, dict[str, Any]] = {}
    for result, op in _COLLECTIVE.findall(hlo):
        arrays = _array_bytes(result)
        entry = found.setdefault(op, {'count': 0, 'bytes': 0, 'shapes': []})
        entry['count'] += 1
        # An async start op returns (operands, results): its results are the last half.
        arrays = (
            arrays[len(arrays) // 2 :] if result.startswith('(') and len(arrays) > 1 else arrays
        )
        entry['bytes'] += sum(b for b, _ in arrays)
        entry['shapes'].extend(shape for _, shape in arrays)
    return found


def attention_gathers(
    found: dict[str, dict[str, Any]], rows: int, ctx_len: int, head_dim: int
) -> int:
    """All-gathers whose result is a whole micro-batch of queries, keys or values ((rows, T,
    heads, K), or heads first) on every device: what a kernel XLA cannot partition is fed."""
    return sum(
        1
        for shape in found.get('all-gather', {}).get('shapes', [])
        if len(shape) == 4 and shape[0] == rows and shape[3] == head_dim and ctx_len in shape[1:3]
    )


@dataclasses.dataclass
class Compiled:
    """What one compile of a config's train step shows."""

    memory: dict[str, int]  # Per device: state, batch, temporaries, code, total.
    compiler_flops: float | None  # Per device per step; None where the compiler gives none.
    bytes_accessed: float | None
    collectives: dict[str, dict[str, Any]]
    custom_calls: list[str]
    compile_s: float
    eval_compile_s: float
    eval_temp_bytes: int
    refused: str = ''  # The compiler's out-of-memory message, when it would not compile.


def compile_steps(plan: run_plan.RunPlan, devices: list) -> Compiled:
    """Compiles the plan's train_step and eval_step over a mesh of `devices`."""
    mesh = partitioning.make_mesh(plan.mesh, devices)
    config_checks.check_platform(plan.model, mesh.devices.flat[0].platform)
    partitioning.check_batch_size(
        plan.step.batch_size, mesh, plan.step.gradient_accumulation_steps, this_process_feeds=False
    )
    setup = steps.make_train_setup(plan, mesh, total_steps=10_000, initialize=False)
    batch = abstract_batch(plan, mesh)
    state_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(setup.abstract_state))
    batch_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(batch))
    start = time.perf_counter()
    try:
        train = setup.train_step.lower(setup.abstract_state, batch).compile()
    except jax.errors.JaxRuntimeError as e:
        refused = _refused(e, state_bytes, batch_bytes, time.perf_counter() - start)
        if refused is None:
            raise
        return refused
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluate = setup.eval_step.lower(setup.abstract_state.params, batch).compile()
    eval_compile_s = time.perf_counter() - start

    memory = train.memory_analysis()
    # The state is donated: its outputs reuse its buffers (alias), so arguments + temporaries
    # + code is what the step holds at its peak.
    used = {
        'state': state_bytes,
        'batch': batch_bytes,
        'temporaries': int(memory.temp_size_in_bytes),
        'code': int(memory.generated_code_size_in_bytes),
    }
    used['total'] = (
        int(memory.argument_size_in_bytes)
        + int(memory.output_size_in_bytes)
        - int(memory.alias_size_in_bytes)
        + used['temporaries']
        + used['code']
    )
    cost = train.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    hlo = train.as_text()
    return Compiled(
        memory=used,
        compiler_flops=(cost or {}).get('flops'),
        bytes_accessed=(cost or {}).get('bytes accessed'),
        collectives=collectives(hlo),
        custom_calls=sorted(set(_CUSTOM_CALL.findall(hlo))),
        compile_s=compile_s,
        eval_compile_s=eval_compile_s,
        eval_temp_bytes=int(evaluate.memory_analysis().temp_size_in_bytes),
    )


def _refused(
    error: Exception, state_bytes: int, batch_bytes: int, compile_s: float
) -> Compiled | None:
    """A Compiled that records the compiler's refusal to fit the step, with the temporaries it
    said it would need; None when the error is not such a refusal."""
    # The TPU compiler refuses a program that cannot fit, naming what it would need.
    need = re.search(r'HLO temporaries \(([\d.]+)([KMGT])\)', str(error))
    if need is None:
        return None
    temporaries = int(float(need.group(1)) * 1024 ** ('KMGT'.index(need.group(2)) + 1))
    return Compiled(
        memory={
            'state': state_bytes,
            'batch': batch_bytes,
            'temporaries': temporaries,
            'code': 0,
            'total': state_bytes + batch_bytes + temporaries,
        },
        compiler_flops=None,
        bytes_accessed=None,
        collectives={},
        custom_calls=[],
        compile_s=compile_s,
        eval_compile_s=0.0,
        eval_temp_bytes=0,
        refused=str(error).strip().splitlines()[-1][:300],
    )


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    return math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize


def kernels(custom_calls: list[str]) -> list[str]:
    """The attention kernels among an executable's custom calls ('xla' when none)."""
    found = sorted(
        {
            what
            for call in custom_calls
            for name, what in KERNEL_CALLS.items()
            if call.startswith(name)
        }
    )
    return found or ['xla (no fused kernel)']


def roofline(
    plan: run_plan.RunPlan, target: compile_targets.Target, compiled: Compiled
) -> dict[str, Any]:
    """A floor on the step time from the chip's published peaks: the model's FLOPs at peak,
    the bytes the compiler says a device touches at full HBM bandwidth, and the collectives'
    bytes at full interconnect bandwidth; the largest is the floor. A bound, not a forecast."""
    chip = target.chip
    tokens = plan.step.batch_size * plan.model.ctx_len
    model_flops = flops.flops_per_token(plan.model)['total'] * tokens
    floors = {'compute_s': model_flops / (target.chips * chip.peak_flops)}
    if compiled.bytes_accessed:
        floors['memory_s'] = compiled.bytes_accessed / chip.hbm_bandwidth
    collective_bytes = sum(c['bytes'] for c in compiled.collectives.values())
    if target.chips > 1:
        floors['collectives_s'] = collective_bytes / chip.interconnect_bandwidth
    bound = max(floors, key=floors.get)
    floor_s = floors[bound]
    return {
        'model_flops_per_step': model_flops,
        **floors,
        'floor_s': floor_s,
        'bound_by': bound,
        'tokens_per_s_ceiling': tokens / floor_s,
        'collective_bytes': collective_bytes,
    }


def _fits(memory: dict[str, int], chip: compile_targets.Chip) -> bool:
    return memory['total'] <= FIT_FRACTION * chip.hbm_bytes


def remedies(config, devices: list, chip: compile_targets.Chip) -> list[dict[str, Any]]:
    """For a config that does not fit: each change on its own (planned again), compiled, with
    its memory."""
    tried = []
    mesh = partitioning.make_mesh(config.mesh, devices)
    if mesh.shape['fsdp'] < len(devices):
        tried.append(('mesh.fsdp=-1 mesh.data=1', {'mesh.fsdp': -1, 'mesh.data': 1}))
    if not config.remat:
        tried.append(('remat=True', {'remat': True}))
    micro = config.batch_size // config.gradient_accumulation_steps
    if micro % (2 * len(devices)) == 0:
        tried.append(
            (
                f'gradient_accumulation_steps={2 * config.gradient_accumulation_steps}',
                {'gradient_accumulation_steps': 2 * config.gradient_accumulation_steps},
            )
        )
        tried.append(
            (f'batch_size={config.batch_size // 2}', {'batch_size': config.batch_size // 2})
        )
    out = []
    for change, fields in tried:
        changed = config.copy_and_resolve_references()
        for key, value in fields.items():
            node, _, leaf = key.rpartition('.')
            (changed[node] if node else changed)[leaf] = value
        try:
            compiled = compile_steps(run_plan.resolve(changed), devices)
            memory = compiled.memory
        except UserError as e:
            out.append({'change': change, 'error': str(e)})
            continue
        out.append(
            {
                'change': change,
                'total_bytes': memory['total'],
                'fits': _fits(memory, chip) and not compiled.refused,
            }
        )
    return out


def check(config, target_name: str) -> dict[str, Any]:
    """The pre-flight report of one target (JSON-ready)."""
    target = compile_targets.parse(target_name)
    devices = compile_targets.devices(target)
    plan = run_plan.resolve(config)
    compiled = compile_steps(plan, devices)
    fits = _fits(compiled.memory, target.chip) and not compiled.refused
    step = plan.step
    gathers = attention_gathers(
        compiled.collectives,
        step.batch_size // step.gradient_accumulation_steps,
        plan.model.ctx_len,
        plan.model.head_dim,
    )
    report = {
        'target': target.name,
        'device_kind': devices[0].device_kind,
        'chips': target.chips,
        'hosts': target.hosts,
        'topology': target.topology,
        'mesh': dict(partitioning.make_mesh(plan.mesh, devices).shape),
        'batch_size': step.batch_size,
        'ctx_len': plan.model.ctx_len,
        'gradient_accumulation_steps': step.gradient_accumulation_steps,
        'attention_impl': plan.model.attention_impl,
        'memory_per_device': compiled.memory,
        'device_memory': target.chip.hbm_bytes,
        'fits': fits,
        'compiler_flops_per_device': compiled.compiler_flops,
        'kernels': kernels(compiled.custom_calls),
        'custom_calls': compiled.custom_calls,
        'attention_gathers': gathers,
        'collectives': {
            op: {k: v for k, v in c.items() if k != 'shapes'}
            for op, c in compiled.collectives.items()
        },
        'roofline': roofline(plan, target, compiled),
        'compile_s': compiled.compile_s,
        'eval_compile_s': compiled.eval_compile_s,
        'eval_temporaries': compiled.eval_temp_bytes,
        'chip_source': target.chip.source,
        'compiler_refused': compiled.refused,
    }
    if not fits:
        report['remedies'] = remedies(config, devices, target.chip)
    return report
