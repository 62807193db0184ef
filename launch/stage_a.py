"""Stage A: pretrain the Thinker on text.

  python -m launch.stage_a --config=configs/tiny.py [--config.batch_size=8 ...] [--verbose]
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from muomni_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py file.',
                                          lock_config=True)
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Show full tracebacks for input errors.')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    if not _VERBOSE.value:
        logging.set_verbosity(logging.WARNING)  # Orbax and JAX log every save at INFO.
    # Imported after flag parsing: JAX and TF are slow to import.
    from muomni_jax import distributed
    from muomni_jax import train
    try:
        distributed.initialize(_CONFIG.value)  # Before any other JAX use; no-op for one process.
        train.train_and_evaluate(_CONFIG.value)
    except UserError as e:
        if _VERBOSE.value:
            raise
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    flags.mark_flags_as_required(['config'])
    app.run(main)
