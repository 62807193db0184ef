"""Runs launchers one after another in this one process, each as `python -m MODULE ARGS...`
would (its module run as __main__, its absl flags fresh, sys.exit caught), and writes what each
did: a test of something every launcher must do in one kind of process (tests/
test_without_tensorflow.py) pays for one interpreter and one JAX import, not one per launcher.

  python -m tests.launcher_sequence RESULTS.json '[["launch.stage_a", "--config=..."], ...]'

RESULTS.json: a list, per command, of {"returncode", "stdout", "stderr"}; an exception other
than SystemExit is caught too (returncode 1, its traceback in stderr, as the interpreter prints
it), so the next command still runs.
"""

import contextlib
import io
import json
import runpy
import sys
import traceback

from absl import (
    app,  # noqa: F401  (its flags, as launchers use it: defined once)
    flags,
)

import launch
import launch.cli  # noqa: F401  (--verbose, shared by every launcher: defined once)


def _reset_flags(kept: set[str]) -> None:
    """Every flag back to unparsed, and the flags a launcher defined removed (they are defined
    again when its module runs), as in a fresh process."""
    flags.FLAGS.unparse_flags()
    for name in [name for name in flags.FLAGS if name not in kept]:
        delattr(flags.FLAGS, name)
    # Defines --config on import: imported afresh by the next launcher that needs it.
    sys.modules.pop('launch.training_config', None)
    if hasattr(launch, 'training_config'):
        delattr(launch, 'training_config')


def run(module: str, *args: str, kept: set[str]) -> dict:
    _reset_flags(kept)
    out, err = io.StringIO(), io.StringIO()
    returncode = 0
    argv = sys.argv
    sys.argv = [module, *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_module(module, run_name='__main__', alter_sys=True)
            except SystemExit as e:
                code = e.code
                returncode = code if isinstance(code, int) else (0 if code is None else 1)
                if code is not None and not isinstance(code, int):
                    print(code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                returncode = 1
    finally:
        sys.argv = argv
    return {'returncode': returncode, 'stdout': out.getvalue(), 'stderr': err.getvalue()}


def _initialize_once() -> None:
    """distributed.initialize (which stage_a calls first) for real in the first launcher only:
    a later one finds JAX started in this process, where JAX refuses to initialize; in a
    fresh process it would find no cluster and be the no-op it is for one process."""
    from muomni_jax.parallel import distributed

    original, calls = distributed.initialize, []

    def initialize(config):
        calls.append(config)
        if len(calls) == 1:
            original(config)

    distributed.initialize = initialize


def main() -> None:
    results_path, commands = sys.argv[1], json.loads(sys.argv[2])
    _initialize_once()
    kept = set(flags.FLAGS)  # absl's own flags and --verbose.
    results = []
    for command in commands:
        results.append(run(*command, kept=kept))
        print(f'{command[0]}: exit {results[-1]["returncode"]}', flush=True)
    with open(results_path, 'w', encoding='utf-8') as f:
        json.dump(results, f)


if __name__ == '__main__':
    main()
