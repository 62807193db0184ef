"""launch.device_check end to end in its --quick form on the CPU: the script that measures the
accelerator path runs every part (the launcher twice on one compilation cache, the step per
attention kernel, the original's step beside ours) and writes its JSON and table. Its figures
are not checked: on a CPU at toy shapes they mean nothing. It runs from a folder outside the
checkout, as from an installed package: the launcher's config and corpus are found from there.
"""

import json
import statistics

import pytest

from tests.support.processes import run_module

pytestmark = pytest.mark.slow


def test_quick_device_check_runs_every_part(tmp_path):
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    result = run_module(
        'launch.device_check',
        '--quick',
        f'--output_dir={tmp_path}',
        cwd=str(elsewhere),
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / 'device_check.json').read_text())
    table = (tmp_path / 'device_check.md').read_text()
    assert table.strip() in result.stdout
    cold, warm = figures['launcher']
    assert (cold['cache'], warm['cache']) == ('cold', 'warm')
    for run in (cold, warm):
        assert 'error' not in run, run
        assert len(run['tokens_per_s_intervals']) == 5  # A log line every fifth of the steps.
        assert run['first_step_s'] is not None and run['tokens_per_s'] > 0
    kernels = {row['attention_impl']: row for row in figures['step_only']}
    assert set(kernels) == {'xla', 'pallas'}
    assert all('error' not in row and row['tokens_per_s'] > 0 for row in kernels.values())
    # The same weights, batch and function: the kernels' first losses agree.
    assert kernels['pallas']['loss'] == pytest.approx(kernels['xla']['loss'], rel=1e-4)
    (original,) = figures['original']
    assert original['available'] and original['recipe']['device'] == 'cpu'
    # A second route to the speedup than the code's ratio of token rates: both steps take the
    # same batch, so it is the ratio of the median step times the figures also record.
    assert original['speedup'] == pytest.approx(
        statistics.median(original['step_s']) / statistics.median(original['ours_step_s'])
    )
    assert f'{original["speedup"]:.2f}x |' in table
    assert "| batch | original's recipe tokens/s" in table
