"""Tokenize a corpus into the token cache (and train the tokenizer) without training.

  python -m launch.prepare_data --config=configs/tiny.py [--config.data_shards=4 ...]

Run it once on one machine before a pod run, with the pod run's config (the same data, val_split,
save_dir or tokenizer_path and data_shards) and a cache_dir every host can read: the pod then
opens the cache and starts training at once. Exit status 0, or 2 with one `error:` line.
"""

from absl import app, flags

from launch import cli, training_config


def main(argv):
    if len(argv) > 1:
        cli.fail(f'unexpected arguments: {" ".join(argv[1:])} (use --config.name=value)')
    config = training_config.value()
    from muomni_jax.parallel import distributed  # Imported after flag parsing: JAX and TF are slow.
    from muomni_jax.training import data_preparation

    with cli.one_line_errors():
        distributed.initialize(config)
        data_preparation.prepare_data(config)


if __name__ == '__main__':
    flags.mark_flags_as_required(['config'])
    app.run(main, flags_parser=training_config.parse_flags)
