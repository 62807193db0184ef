"""launch.preflight: the real steps compiled for TPUs and GPUs this machine does not have.

Needs the compilers of requirements-preflight.txt in .compilers (.ci/run installs them); the
tests that compile are skipped without them. Each compile runs in its own process: the
compilers must be on the path before JAX starts a backend.
"""

import json
import os

import pytest

from muomni_jax.errors import UserError
from muomni_jax.parallel import compile_targets
from muomni_jax.training import preflight
from tests.support.environment import REPO
from tests.support.processes import run_module

COMPILERS = os.path.join(REPO, '.compilers')
needs_compilers = pytest.mark.skipif(
    not os.path.isdir(os.path.join(COMPILERS, 'libtpu')),
    reason='no .compilers: pip install --no-deps --target .compilers -r requirements-preflight.txt',
)
# The tiny Thinker in bfloat16, small enough to compile in seconds here.
TINY = ['--config=configs/accelerator.py', '--config.n_layers=2', '--config.vocab_size=4096']


def _preflight(tmp_path, *args):
    output = tmp_path / 'preflight.json'
    result = run_module(
        'launch.preflight',
        *TINY,
        f'--compilers={COMPILERS}',
        f'--output={output}',
        *args,
        timeout=600,
    )
    reports = json.loads(output.read_text()) if output.exists() else None
    return result, reports


@needs_compilers
@pytest.mark.parametrize(
    'mesh',
    [
        ['--config.mesh.fsdp=-1', '--config.mesh.data=1'],
        ['--config.mesh.data=-1', '--config.mesh.fsdp=1'],
    ],
    ids=['fsdp', 'data'],
)
def test_splash_compiles_as_mosaic_and_partitions_on_a_4_chip_v5e(tmp_path, mesh):
    result, reports = _preflight(
        tmp_path, '--target=v5e-4', '--config.attention_impl=splash', *mesh
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = reports[0]
    assert report['chips'] == 4 and report['device_kind'] == 'TPU v5 lite'
    assert 'tpu_custom_call' in report['custom_calls']
    assert report['kernels'] == ['Mosaic (splash)']
    assert report['attention_gathers'] == 0  # Each chip attends over its own rows.
    assert report['fits'] and 0 < report['memory_per_device']['total'] < report['device_memory']
    assert 'Roofline floor: ' in result.stdout and 'not a measurement' in result.stdout


@needs_compilers
@pytest.mark.parametrize(
    'impl,call', [('pallas', '__gpu$xla.gpu.triton'), ('cudnn', '__cudnn$fmha')]
)
def test_pallas_and_cudnn_compile_and_partition_on_8_h100s(tmp_path, impl, call):
    result, reports = _preflight(
        tmp_path, '--target=h100x8', f'--config.attention_impl={impl}', '--config.batch_size=64'
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = reports[0]
    assert report['mesh'] == {'data': 8, 'fsdp': 1}
    assert any(c.startswith(call) for c in report['custom_calls']), report['custom_calls']
    assert report['attention_gathers'] == 0  # No all-gather of q, k or v.


@needs_compilers
def test_an_oversized_config_does_not_fit_one_v5e_chip_and_says_what_was_tried(tmp_path):
    # A 262,144-piece vocabulary at d_model 2048: 1.1B parameters, 13.7 GB of state and Adam
    # moments on one 16 GiB chip before any activation. The TPU compiler refuses it.
    result, reports = _preflight(
        tmp_path,
        '--target=v5e-1',
        '--config.vocab_size=262144',
        '--config.d_model=2048',
        '--config.n_heads=16',
        '--config.d_ff=4096',
        '--config.attention_impl=xla',
    )
    assert result.returncode == 1, result.stderr[-3000:]
    report = reports[0]
    assert not report['fits'] and 'RESOURCE_EXHAUSTED' in report['compiler_refused']
    assert report['memory_per_device']['state'] > 13e9
    assert report['memory_per_device']['total'] > report['device_memory']
    assert 'DOES NOT FIT' in result.stdout
    # Each change on its own, compiled, with its own figure: none of them rescues it.
    changes = {r['change']: r for r in report['remedies']}
    assert set(changes) == {'remat=True', 'gradient_accumulation_steps=2', 'batch_size=8'}
    assert all(
        r['total_bytes'] > report['device_memory'] and not r['fits'] for r in changes.values()
    )
    assert 'remat=True: total ' in result.stdout and 'still does not fit' in result.stdout


def test_an_unknown_target_is_one_line(tmp_path):
    result = run_module('launch.preflight', *TINY, '--target=v9z-8')
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown target 'v9z-8': name a Cloud TPU slice (v4-N, v5e-N, v5p-N, v6e-N) or "
        f'GPUs (a100xN, h100xN, h200xN), e.g. {compile_targets.EXAMPLES}'
    ]


@pytest.mark.parametrize('target,what', [('v5e-4', 'libtpu'), ('h100x8', 'the CUDA plugin')])
def test_a_missing_compiler_is_one_line_naming_what_to_install(tmp_path, target, what):
    result = run_module(
        'launch.preflight', *TINY, f'--target={target}', f'--compilers={tmp_path / "none"}'
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot describe {target}'s devices")
    assert f'is {what}' in lines[0] and 'requirements-preflight.txt' in lines[0]


def test_cloud_names_map_to_chips_topologies_and_hosts():
    cases = {
        'v5e-256': (256, 32, 'v5e:16x16'),
        'v4-32': (16, 4, 'v4:2x2x4'),
        'v5p-128': (64, 16, 'v5p:4x4x4'),
        'v6e-8': (8, 1, 'v6e:2x4'),
        'h100x8': (8, 1, '1x1x8'),
        'h200x16': (16, 2, '1x2x8'),
        'a100x1': (1, 1, '1x1x1'),
    }
    for name, (chips, hosts, topology) in cases.items():
        target = compile_targets.parse(name)
        assert (target.chips, target.hosts, target.topology) == (chips, hosts, topology), name
    for bad in ('v5e-3', 'v4-6', 'h100x12'):
        with pytest.raises(UserError):
            compile_targets.parse(bad)


def test_collectives_are_read_from_the_executable_text():
    hlo = """
  %ag = bf16[128,512,4,64]{3,2,1,0} all-gather(bf16[16,512,4,64]{3,2,1,0} %q), dimensions={0}
  %ags = (bf16[16,512,2,64]{3,2,1,0}, bf16[128,512,2,64]{3,2,1,0}) all-gather-start(%k)
  %ar = f32[1024,256]{1,0} all-reduce(f32[1024,256]{1,0} %g), to_apply=%add
  %cc = bf16[16,512,4,64]{3,2,1,0} custom-call(%ag), custom_call_target="__gpu$xla.gpu.triton"
"""
    found = preflight.collectives(hlo)
    assert found['all-gather']['count'] == 2
    assert found['all-gather']['bytes'] == 2 * (128 * 512 * 4 * 64 + 128 * 512 * 2 * 64)
    assert found['all-reduce'] == {'count': 1, 'bytes': 4 * 1024 * 256, 'shapes': [(1024, 256)]}
    assert preflight.attention_gathers(found, rows=128, ctx_len=512, head_dim=64) == 2
    assert preflight.attention_gathers(found, rows=16, ctx_len=512, head_dim=64) == 0
