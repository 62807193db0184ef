"""Processes the tests start: launchers and scripts on one CPU device, as a user runs them, to
completion or held open with their output read as it comes."""

import contextlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.environment import COMPILATION_CACHE, REPO


def one_device_env(**extra: str) -> dict[str, str]:
    """This environment without the 8-device XLA_FLAGS, so a subprocess sees one CPU device as a
    user's run does; it shares the session's compilation cache. extra: variables to add."""
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env.update(
        JAX_COMPILATION_CACHE_DIR=COMPILATION_CACHE,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5',
    )
    env.update(extra)
    return env


def run_module(
    module: str, *args: str, cwd: str = REPO, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m module args...` to completion, output captured (default: one_device_env());
    subprocess.run kills it if it outlives the timeout."""
    return subprocess.run(
        [sys.executable, '-m', module, *args],
        cwd=cwd,
        env=env or one_device_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_code(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -c code args...` from the repository, to completion, on one CPU device."""
    return subprocess.run(
        [sys.executable, '-c', code, *args],
        cwd=REPO,
        env=one_device_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_stage_a(
    *args: str, cwd: str = REPO, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """launch.stage_a --config=configs/tiny.py args..., to completion (the config's path as a
    user in the repository types it; absolute from elsewhere)."""
    config = 'configs/tiny.py' if cwd == REPO else os.path.join(REPO, 'configs', 'tiny.py')
    return run_module(
        'launch.stage_a', f'--config={config}', *args, cwd=cwd, timeout=timeout, env=env
    )


class Launched:
    """A process started by `launched`: its output is read by threads as it comes, so every
    wait has a timeout and a process that hangs fails its test instead of stalling it."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.pid = process.pid
        self._lines = {'stdout': [], 'stderr': []}
        self._new_lines = queue.Queue()  # (stream name, line); None per stream at its end.
        self._ended = 0  # Streams whose end wait_for_line has seen.
        self._readers = [
            threading.Thread(target=self._read, args=(name, stream), daemon=True)
            for name, stream in (('stdout', process.stdout), ('stderr', process.stderr))
            if stream is not None
        ]
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
def launched(
    command: list[str], env: dict[str, str] | None = None, cwd: str = REPO, stderr: bool = False
) -> Iterator[Launched]:
    """Starts `command` (a list, as for Popen) and ends it on leaving the block, however the
    test left it: SIGKILL unless it already ended, then wait. stderr: read it apart from
    stdout (default: merged into stdout, in order). The child's Python is unbuffered, so what
    a killed run printed is not lost in its buffers."""
    env = dict(env or one_device_env(), PYTHONUNBUFFERED='1')
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if stderr else subprocess.STDOUT,
        text=True,
    )
    started = None
    try:
        started = Launched(process)
        yield started
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for reader in started._readers if started else []:
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
