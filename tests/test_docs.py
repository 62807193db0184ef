"""Every fenced bash block of README.md and docs/*.md runs as written.

The blocks run in page order (README.md, then docs/ by name), each in `bash -e`, in a scratch
copy of the repository: a block may use what an earlier one made (the quick start's
checkpoints/cpu_demo), as it does for a reader who pastes them in order. Three groups of pages
run side by side on pytest's workers; the README and docs/interop.md, which starts from the
quick start's checkpoint, are one group. pytest-codeblocks reads
the blocks and the page's markers:

- `<!--pytest.mark.skip(reason="...")-->` before a block skips it, with the reason the page
  gives (internet, a GPU, a TPU pod, a second host); `-rs` lists them at the end of the run;
- `<!--pytest-codeblocks:importorskip(MODULE)-->` skips a block whose optional package
  (requirements-test.txt) is not installed.

The one change to a command: a `launch.stage_a` run that names no `--config.max_steps` of its
own (the quick start, the 10-epoch tiny run, the mixture) stops after SHORT_RUN_STEPS steps.
A comment line `# prints: TEXT` in a block is output the block must print; a date-time stamp
in TEXT matches any.
"""

import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess

import pytest
from pytest_codeblocks import extract_from_file

from tests.support.environment import REPO
from tests.support.processes import one_device_env

PAGES = ['README.md', *sorted(os.path.relpath(p, REPO) for p in glob.glob(f'{REPO}/docs/*.md'))]
SHORT_RUN_STEPS = 3
# A time stamp in a path, as jax.profiler names its trace folders: 2026_11_25_14_00_26.
_TIME_STAMP = re.compile(r'\d{4}_\d{2}_\d{2}_\d{2}_\d{2}_\d{2}')
_STAGE_A = re.compile(r'python -m launch\.stage_a\b')


def _blocks(pages):
    params = []
    for page in pages:
        for block in extract_from_file(os.path.join(REPO, page)):
            if block.syntax != 'bash':
                continue
            where = f'{page}:{block.lineno}'
            params.append(pytest.param(where, block, id=where))
    return params


def _skip_reason(block) -> str | None:
    """The reason of the page's skip marker before the block, if it has one."""
    for text in block.marks:
        mark = eval(text, {'pytest': pytest})  # The page's own marker, as pytest-codeblocks does.
        if mark.name != 'skip' or not mark.kwargs.get('reason'):
            raise ValueError(f'{text}: a block takes only pytest.mark.skip(reason="...")')
        return mark.kwargs['reason']
    return None


def shortened(code: str) -> str:
    """`code` with SHORT_RUN_STEPS as the max_steps of each launch.stage_a command that sets
    none (a command runs to the first newline that no backslash continues)."""
    out, position = [], 0
    for match in _STAGE_A.finditer(code):
        if match.start() < position:  # Inside the command before (a quoted remote command).
            continue
        end = match.end()
        while True:
            newline = code.find('\n', end)
            if newline == -1 or code[newline - 1] != '\\':
                end = len(code) if newline == -1 else newline
                break
            end = newline + 1
        command = code[match.start() : end]
        if '--config.max_steps' not in command:
            command = re.sub(
                r'(--config=\S+)', rf'\1 --config.max_steps={SHORT_RUN_STEPS}', command, count=1
            )
        out += [code[position : match.start()], command]
        position = end
    return ''.join(out) + code[position:]


def expected_lines(code: str) -> list[re.Pattern]:
    """The `# prints: TEXT` lines of a block, as patterns that take any time stamp."""
    patterns = []
    for line in code.splitlines():
        if line.strip().startswith('# prints: '):
            text = line.strip()[len('# prints: ') :]
            parts = [re.escape(part) for part in _TIME_STAMP.split(text)]
            patterns.append(re.compile(_TIME_STAMP.pattern.join(parts)))
    return patterns


@pytest.fixture(scope='module')
def scratch(tmp_path_factory):
    """A copy of the repository's files (tracked, and new ones git does not ignore), with the
    pre-flight compilers linked in when this checkout has them."""
    root = tmp_path_factory.mktemp('docs') / 'muomni-jax'
    listed = subprocess.run(
        ['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split('\0')):
        source = os.path.join(REPO, name)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(root, name))
    if os.path.isdir(os.path.join(REPO, '.compilers')):
        os.symlink(os.path.join(REPO, '.compilers'), os.path.join(root, '.compilers'))
    return str(root)


def test_the_one_change_is_the_length_of_runs_that_set_none():
    code = (
        'python -m launch.stage_a --config=configs/cpu_demo.py    # 2. train\n'
        'python -m launch.stage_a --config=configs/cpu_demo.py --config.save_dir=a \\\n'
        '  --config.max_steps=20 --config.profile_steps=10,12\n'
        'python -m launch.plot --checkpoint_dir=a\n'
        'python -m launch.stage_a --config=configs/tiny.py \\\n'
        '  --config.save_dir=b\n'
    )
    assert shortened(code) == (
        f'python -m launch.stage_a --config=configs/cpu_demo.py --config.max_steps='
        f'{SHORT_RUN_STEPS}    # 2. train\n'
        'python -m launch.stage_a --config=configs/cpu_demo.py --config.save_dir=a \\\n'
        '  --config.max_steps=20 --config.profile_steps=10,12\n'
        'python -m launch.plot --checkpoint_dir=a\n'
        f'python -m launch.stage_a --config=configs/tiny.py --config.max_steps={SHORT_RUN_STEPS} '
        '\\\n  --config.save_dir=b\n'
    )
    (pattern,) = expected_lines('run\n# prints: Profile written to a/2026_11_25_14_00_26\n')
    assert pattern.search('x\nProfile written to a/2027_01_02_03_04_05\n')
    assert not pattern.search('Profile written to b/2027_01_02_03_04_05')


# Three groups that pytest.ini's --dist loadscope runs on different workers: interop's examples
# start from the quick start's checkpoints/cpu_demo, so they follow the README on one worker.
README_AND_INTEROP = ['README.md', 'docs/interop.md']
DEVICES = ['docs/devices.md']
OTHER_PAGES = [page for page in PAGES if page not in README_AND_INTEROP + DEVICES]


@pytest.mark.slow
class TestReadmeAndInterop:
    @pytest.mark.parametrize('where, block', _blocks(README_AND_INTEROP))
    def test_block_runs_as_written(self, where, block, scratch):
        _run_as_written(where, block, scratch)


@pytest.mark.slow
class TestDevices:
    @pytest.mark.parametrize('where, block', _blocks(DEVICES))
    def test_block_runs_as_written(self, where, block, scratch):
        _run_as_written(where, block, scratch)


@pytest.mark.slow
class TestOtherPages:
    @pytest.mark.parametrize('where, block', _blocks(OTHER_PAGES))
    def test_block_runs_as_written(self, where, block, scratch):
        _run_as_written(where, block, scratch)


def _run_as_written(where, block, scratch):
    if reason := _skip_reason(block):
        pytest.skip(f'{where}: {reason}')
    if block.importorskip:
        pytest.importorskip(block.importorskip, reason=f'{where}: needs {block.importorskip}')
    if 'launch.preflight' in block.code and not os.path.isdir(os.path.join(scratch, '.compilers')):
        pytest.skip(
            f'{where}: no .compilers: pip install --no-deps --target .compilers -r '
            'requirements-preflight.txt'
        )
    code = shortened(block.code)
    # Its own process group: a block's `&` jobs end with it, even when it fails or times out.
    block_process = subprocess.Popen(
        ['bash', '-e', '-o', 'pipefail', '-c', code],
        cwd=scratch,
        env=one_device_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = block_process.communicate(timeout=900)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(block_process.pid, signal.SIGKILL)
        block_process.wait()
    output = stdout + stderr
    assert block_process.returncode == 0, f'{code}\n{output[-4000:]}'
    # A command that failed in the background (a `&` job) leaves its error, not a status.
    assert 'Traceback' not in output and not re.search(r'^error: ', output, re.M), output[-4000:]
    for pattern in expected_lines(block.code):
        assert pattern.search(output), f'{pattern.pattern} not in\n{output[-4000:]}'
