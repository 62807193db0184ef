"""A text run needs no TensorFlow: in a process where `import tensorflow` fails, cpu_demo trains
from a text file, resumes, samples, evaluates and exports (as on an accelerator box without it).
"""

import json
import os
from types import SimpleNamespace

import pytest

from tests.support.configs import SMALL
from tests.support.processes import one_device_env, run_module

pytestmark = pytest.mark.slow


@pytest.fixture
def no_tensorflow_env(tmp_path):
    """one_device_env with packages named tensorflow and tensorflow_datasets first on the path,
    each failing to import."""
    shadow = tmp_path / 'no_tensorflow'
    for name in ('tensorflow', 'tensorflow_datasets'):
        (shadow / name).mkdir(parents=True)
        (shadow / name / '__init__.py').write_text(
            f'raise ImportError("{name} is blocked in this test")\n'
        )
    env = one_device_env()
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(shadow), env.get('PYTHONPATH')]))
    return env


def test_cpu_demo_trains_resumes_samples_evaluates_and_exports(
    tmp_path, corpus_sample, no_tensorflow_env
):
    """The launchers run in sequence in one such process (tests/launcher_sequence.py: each as
    `python -m` would run it), which pays for one interpreter and JAX import, not seven."""
    save_dir = tmp_path / 'run'
    common = [
        '--config=configs/cpu_demo.py',
        *SMALL,
        f'--config.data_path={corpus_sample}',
        f'--config.save_dir={save_dir}',
        '--config.save_every=2',
        '--config.sample_prompts=',
        '--config.peak_flops_per_device=1e11',
    ]
    exported = tmp_path / 'export' / 'thinker.safetensors'
    commands = [
        ['launch.stage_a', *common, '--config.max_steps=4'],
        ['launch.stage_a', *common, '--config.max_steps=6'],
        ['launch.sample', f'--checkpoint_dir={save_dir}', '--prompt=The cat', '--max_new_tokens=4'],
        ['launch.evaluate', f'--checkpoint_dir={save_dir}', f'--data_path={corpus_sample}'],
        ['launch.convert', f'--checkpoint_dir={save_dir}', f'--output={exported}'],
        ['launch.plot', f'--checkpoint_dir={save_dir}', f'--output={tmp_path / "c.png"}'],
        [
            'launch.stage_a',
            '--config=configs/cpu_demo.py',
            '--config.tfds_name=lm1b',
            f'--config.save_dir={tmp_path / "tfds"}',
        ],
    ]
    results_path = tmp_path / 'results.json'
    done = run_module(
        'tests.launcher_sequence',
        str(results_path),
        json.dumps(commands),
        env=no_tensorflow_env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    first, second, sample, evaluate, convert, plot, blocked = (
        SimpleNamespace(**r) for r in json.loads(results_path.read_text())
    )

    assert first.returncode == 0, first.stderr[-3000:]
    assert '[Step 4/4]' in first.stdout
    assert second.returncode == 0, second.stderr[-3000:]
    assert 'Resuming from checkpoint step 4' in second.stdout and '[Step 6/6]' in second.stdout
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert 'Generated: The cat' in sample.stdout
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert 'Loss: ' in evaluate.stdout
    assert convert.returncode == 0, convert.stderr[-3000:]
    assert exported.stat().st_size > 0
    assert plot.returncode == 0, plot.stderr[-3000:]
    assert (tmp_path / 'c.png').stat().st_size > 0
    # The shadow works, and a TFDS source without TensorFlow is one line.
    assert blocked.returncode == 2 and 'Traceback' not in blocked.stderr, blocked.stderr[-3000:]
    assert (
        'error: TFDS sources need TensorFlow, which does not import here (tensorflow is '
        'blocked in this test)'
    ) in blocked.stderr
