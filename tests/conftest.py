"""Test set-up: eight virtual CPU devices, so every test also exercises sharding.

The device count must be fixed before JAX first touches a backend, hence here.
"""

import atexit
import contextlib
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The default token cache (~/.cache/...) of every run the tests start, in-process or not: shared
# by the tests, so a corpus is tokenized once per session, and never the user's own cache.
os.environ['XDG_CACHE_HOME'] = tempfile.mkdtemp(prefix='muomni-test-cache-')
atexit.register(shutil.rmtree, os.environ['XDG_CACHE_HOME'], ignore_errors=True)
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, 'data', 'text', 'corpus.txt')

# One persistent compilation cache for this session, in-process and in every launcher subprocess:
# the tests compile the same tiny train and eval steps many times. Fresh per session, so a run's
# time never depends on an earlier one.
COMPILATION_CACHE = tempfile.mkdtemp(prefix='muomni_jax_test_cache_')
atexit.register(shutil.rmtree, COMPILATION_CACHE, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', COMPILATION_CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

from configs import tiny  # pylint: disable=g-import-not-at-top
from muomni_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
from muomni_jax.model.thinker import abstract_model  # pylint: disable=g-import-not-at-top
from muomni_jax.parallel import partitioning  # pylint: disable=g-import-not-at-top
from muomni_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
from muomni_jax.training import steps  # pylint: disable=g-import-not-at-top
from muomni_jax.training import run_plan  # pylint: disable=g-import-not-at-top
from muomni_jax.training import train  # pylint: disable=g-import-not-at-top


def pytest_configure(config):
    # Registered here, so `-m "not slow"` and `--strict-markers` know the marker.
    config.addinivalue_line(
        'markers', 'slow: starts a launcher or another subprocess, an emulator or several '
        'processes, or works for many seconds in process (trainings of its own, or many '
        'compiles of the full model); `-m "not slow"` leaves them out (the fast tier).')


# A stated CPU peak (FLOP/s per device): without one, every training start times six 2048^2
# matmuls (0.5-3 s, and a load on every test beside it). Only the tests of that measurement
# leave it at 0.
PEAK_FLOPS = 1e11

# Fields of a training_log record that depend on wall-clock time, not on the computation.
TIMING_FIELDS = ('tokens_per_s', 'mfu', 'elapsed_s')


def small_config(save_dir, data_path, **overrides):
    """configs/tiny.py shrunk to seconds on a CPU, with the peak stated and no samples (tests
    that read either say so); overrides win."""
    config = tiny.get_config()
    config.update(dict(
        vocab_size=256, n_layers=2, d_model=64, n_heads=4, d_ff=128, ctx_len=32, dropout=0.0,
        batch_size=8, num_epochs=1, max_steps=6, warmup_steps=2, learning_rate=1e-3,
        log_every=2, eval_every=3, eval_batches=2, save_every=3, data_path=str(data_path),
        save_dir=str(save_dir), tokenizer_sample_size=20000, peak_flops_per_device=PEAK_FLOPS,
        sample_prompts=''))
    config.update(overrides)
    return config


# small_config as launcher flags (without data_path and save_dir; test_launch checks that they
# give the same config).
SMALL = ['--config.vocab_size=256', '--config.n_layers=2', '--config.d_model=64',
         '--config.n_heads=4', '--config.d_ff=128', '--config.ctx_len=32', '--config.dropout=0.0',
         '--config.batch_size=8', '--config.num_epochs=1', '--config.max_steps=6',
         '--config.warmup_steps=2', '--config.learning_rate=0.001', '--config.log_every=2',
         '--config.eval_every=3', '--config.eval_batches=2', '--config.save_every=3',
         '--config.tokenizer_sample_size=20000', f'--config.peak_flops_per_device={PEAK_FLOPS}',
         '--config.sample_prompts=']


def one_device_env(**extra: str) -> dict[str, str]:
    """This environment without the 8-device XLA_FLAGS, so a subprocess sees one CPU device as a
    user's run does; it shares the session's compilation cache. extra: variables to add."""
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env.update(JAX_COMPILATION_CACHE_DIR=COMPILATION_CACHE,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5')
    env.update(extra)
    return env


def run_module(module: str, *args: str, cwd: str = REPO, timeout: int = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m module args...` to completion, output captured (default: one_device_env());
    subprocess.run kills it if it outlives the timeout."""
    return subprocess.run([sys.executable, '-m', module, *args], cwd=cwd,
                          env=env or one_device_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_code(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -c code args...` from the repository, to completion, on one CPU device."""
    return subprocess.run([sys.executable, '-c', code, *args], cwd=REPO, env=one_device_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_stage_a(*args: str, cwd: str = REPO, timeout: int = 300,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """launch.stage_a --config=configs/tiny.py args..., to completion (the config's path as a
    user in the repository types it; absolute from elsewhere)."""
    config = 'configs/tiny.py' if cwd == REPO else os.path.join(REPO, 'configs', 'tiny.py')
    return run_module('launch.stage_a', f'--config={config}', *args, cwd=cwd, timeout=timeout,
                      env=env)


class Launched:
    """A process started by `launched`: its output is read by threads as it comes, so every
    wait has a timeout and a process that hangs fails its test instead of stalling it."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.pid = process.pid
        self._lines = {'stdout': [], 'stderr': []}
        self._new_lines = queue.Queue()  # (stream name, line); None per stream at its end.
        self._ended = 0  # Streams whose end wait_for_line has seen.
        self._readers = [threading.Thread(target=self._read, args=(name, stream), daemon=True)
                         for name, stream in (('stdout', process.stdout),
                                              ('stderr', process.stderr)) if stream is not None]
        for reader in self._readers:
            reader.start()

    def _read(self, name, stream):
        for line in iter(stream.readline, ''):
            self._lines[name].append(line)
            self._new_lines.put((name, line))
        self._new_lines.put((name, None))

    @property
    def stdout(self) -> str:
        """What the process printed so far (with stderr, unless launched(..., stderr=True))."""
        return ''.join(self._lines['stdout'])

    @property
    def stderr(self) -> str:
        return ''.join(self._lines['stderr'])

    def wait_for_line(self, startswith: str, timeout: float = 240) -> str:
        """Blocks until the process prints a line starting with `startswith` (on either
        stream; a line printed before this call counts too); fails if the process ends or the
        timeout passes first."""
        for name in self._lines:
            for line in list(self._lines[name]):
                if line.startswith(startswith):
                    return line
        deadline = time.monotonic() + timeout
        while self._ended < len(self._readers):
            try:
                _, line = self._new_lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f'no line {startswith!r} within {timeout} s:\n{self.output_tail()}')
            if line is None:
                self._ended += 1
            elif line.startswith(startswith):
                return line
        pytest.fail(f'the process ended before a line {startswith!r}:\n{self.output_tail()}')

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 240) -> None:
        """Polls condition() every 50 ms (not a busy loop beside the run it watches); fails if
        the process ends or the timeout passes first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f'the process ended before {what}:\n{self.output_tail()}')
            if time.monotonic() > deadline:
                pytest.fail(f'no {what} within {timeout} s:\n{self.output_tail()}')
            time.sleep(0.05)

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 300) -> int:
        """The exit status, once the process ended and all its output was read."""
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f'the process did not end within {timeout} s:\n{self.output_tail()}')
        for reader in self._readers:
            reader.join(timeout=30)
        return returncode

    def kill(self) -> int:
        """SIGKILL, then the exit status once it is gone."""
        self.process.kill()
        return self.wait(timeout=60)

    def output_tail(self, chars: int = 3000) -> str:
        return (self.stdout + self.stderr)[-chars:]


@contextlib.contextmanager
def launched(command: list[str], env: dict[str, str] | None = None, cwd: str = REPO,
             stderr: bool = False) -> Iterator[Launched]:
    """Starts `command` (a list, as for Popen) and ends it on leaving the block, however the
    test left it: SIGKILL unless it already ended, then wait. stderr: read it apart from
    stdout (default: merged into stdout, in order). The child's Python is unbuffered, so what
    a killed run printed is not lost in its buffers."""
    env = dict(env or one_device_env(), PYTHONUNBUFFERED='1')
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE if stderr else subprocess.STDOUT, text=True)
    started = None
    try:
        started = Launched(process)
        yield started
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for reader in started._readers if started else []:  # pylint: disable=protected-access
            reader.join(timeout=30)  # The pipes end with the process; then close them.
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def module_command(module: str, *args: str) -> list[str]:
    return [sys.executable, '-m', module, *args]


def stage_a_command(*args: str) -> list[str]:
    return module_command('launch.stage_a', '--config=configs/tiny.py', *args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def one_device_mesh():
    return partitioning.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])


def log_without_timing(save_dir, drop: tuple[str, ...] = ()) -> list[dict]:
    """save_dir's training_log.json without the fields that depend on wall-clock time (and
    `drop`): what two runs of the same computation must agree on exactly. save_dir may be a
    gs:// URL."""
    from etils import epath  # pylint: disable=import-outside-toplevel
    records = json.loads((epath.Path(str(save_dir)) / 'training_log.json').read_text())
    return [{k: v for k, v in record.items() if k not in TIMING_FIELDS + tuple(drop)}
            for record in records]


def assert_trees_equal(expected, actual, check_sharding: bool = False) -> None:
    """The same tree structure, and every leaf bitwise equal with the same dtype (and the same
    sharding, if asked); a failure names the leaf's path."""
    expected_leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
    actual_leaves = jax.tree_util.tree_flatten_with_path(actual)[0]
    assert jax.tree.structure(expected) == jax.tree.structure(actual)
    assert len(expected_leaves) > 0
    for (path, a), (_, b) in zip(expected_leaves, actual_leaves):
        name = jax.tree_util.keystr(path)
        a_host, b_host = np.asarray(a), np.asarray(b)
        assert a_host.dtype == b_host.dtype, (name, a_host.dtype, b_host.dtype)
        np.testing.assert_array_equal(a_host, b_host, err_msg=name)
        if check_sharding:
            assert a.sharding == b.sharding, name


def perturbed_model(config, seed: int = 0) -> nnx.Module:
    """A Thinker whose every param is O(1)-scale random, so a comparison is not dominated by
    the init's scales or its ones and zeros: embeddings N(0, 1), kernels N(0, 1/fan_in), norm
    gains 1 + 0.2 N(0, 1), biases 0.1 N(0, 1). Filled from numpy: no initialization through
    JAX, which compiles op by op (seconds per model)."""
    graphdef, abstract = abstract_model(config)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = path[-1].key
        if name == 'weight':  # RMSNorm gains
            value = 1.0 + 0.2 * rng.standard_normal(x.shape)
        elif name == 'embedding':
            value = rng.standard_normal(x.shape)
        elif name == 'bias':
            value = 0.1 * rng.standard_normal(x.shape)
        else:
            value = rng.standard_normal(x.shape) / np.sqrt(x.shape[0])
        return jnp.asarray(value, jnp.float32)

    values = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(abstract, values)
    return nnx.merge(graphdef, abstract)


def saved_state(save_dir, step):
    """The train state of save_dir/<step> exactly as saved, as host arrays, read without a
    target tree (so without this code's idea of its structure)."""
    import warnings  # pylint: disable=import-outside-toplevel
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # Orbax warns that it reads the shardings from the files.
        with ocp.PyTreeCheckpointer() as checkpointer:
            state = checkpointer.restore(os.path.join(str(save_dir), str(step), 'state'))
    return jax.tree.map(np.asarray, state)


def restore_state(config, save_dir, step, mesh=None):
    """The whole train state of save_dir/<step>, on `mesh` (default one device)."""
    setup = steps.make_train_setup(run_plan.resolve(config), mesh or one_device_mesh(), 1,
                                   initialize=False)
    checkpointer = checkpointing.Checkpointer(str(save_dir), read_only=True)
    state, _ = checkpointer.restore(step, setup.abstract_state)
    checkpointer.close()
    return state


@pytest.fixture(scope='session')
def corpus_sample(tmp_path_factory):
    """The first 600 documents of the bundled corpus: real English, small enough for tests."""
    path = tmp_path_factory.mktemp('corpus') / 'sample.txt'
    with open(CORPUS, encoding='utf-8') as f:
        lines = [next(f) for _ in range(600)]
    path.write_text(''.join(lines), encoding='utf-8')
    return path


@pytest.fixture(scope='session')
def two_sources(tmp_path_factory, corpus_sample):
    """corpus_sample split in two by a fixed rule, as data/text/split_corpus.py splits the
    corpus: a folder holding prose.txt and code.txt (the paragraphs with a '(')."""
    folder = tmp_path_factory.mktemp('sources')
    lines = open(corpus_sample, encoding='utf-8').read().splitlines()
    code = [line for line in lines if '(' in line]
    prose = [line for line in lines if '(' not in line]
    assert len(prose) > 2 * len(code) > 200
    (folder / 'prose.txt').write_text('\n'.join(prose) + '\n', encoding='utf-8')
    (folder / 'code.txt').write_text('\n'.join(code) + '\n', encoding='utf-8')
    return folder


@pytest.fixture(scope='session')
def corpus_tokenizer(tmp_path_factory, corpus_sample) -> str:
    """The path of one 256-piece tokenizer of corpus_sample, trained once per session, for
    tests that need a tokenizer of real text but do not test its training."""
    path = tmp_path_factory.mktemp('tokenizer') / 'tokenizer.model'
    lines = corpus_sample.read_text(encoding='utf-8').splitlines()
    tokenizer_lib.train_tokenizer(lines, 256, 20000).save(str(path))
    return str(path)


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory, corpus_sample):
    """(save_dir, stdout, stderr) of one small run, trained once per session: 6 steps on a mesh
    that shards the params 8 ways, logs at steps 2, 4 and 6, checkpoints and validations at
    steps 3 and 6, each validation followed by the greedy samples of the default two prompts,
    and a profile of steps 2-3. Its output is not a terminal, as under CI or nohup. Read-only:
    a test that changes a save_dir copies it first (shutil.copytree)."""
    import io  # pylint: disable=import-outside-toplevel
    save_dir = tmp_path_factory.mktemp('trained') / 'run'
    config = small_config(save_dir, corpus_sample, sample_prompts='The cat sat on the|Python is a',
                          sample_max_new_tokens=5, profile_steps='2,3')
    config.mesh.data, config.mesh.fsdp = 1, 8
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        train.train_and_evaluate(config)
    return str(save_dir), out.getvalue(), err.getvalue()


def mixture_spec(folder, prose_weight=0.7, code_weight=0.3) -> str:
    """config.mixture of two_sources's folder."""
    return f'prose={folder / "prose.txt"}:{prose_weight},code={folder / "code.txt"}:{code_weight}'


def pytest_report_header(config):
    del config
    return f'jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices'
