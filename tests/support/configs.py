"""Configs of the tests: configs/tiny.py shrunk to seconds on a CPU, as a ConfigDict and as the
launchers' flags."""

from configs import tiny

# A stated CPU peak (FLOP/s per device): without one, every training start times six 2048^2
# matmuls (0.5-3 s, and a load on every test beside it). Only the tests of that measurement
# leave it at 0.
PEAK_FLOPS = 1e11


def tiny_config(**fields):
    """configs/tiny.py with `fields` set."""
    config = tiny.get_config()
    config.update(fields)
    return config


def describing(model_config, **fields):
    """configs/tiny.py with every field of model_config (a ThinkerConfig) that the original's
    config holds: the --config an import of those weights takes; fields win."""
    from muomni_jax.model.thinker import ORIGINAL_FIELDS

    return tiny_config(**{**{k: getattr(model_config, k) for k in ORIGINAL_FIELDS}, **fields})


def corpus_config(data_path, cache_dir=None, **fields):
    """configs/tiny.py reading the documents of data_path, a fifth of them held out (and its
    token cache in cache_dir, if given); fields win."""
    if cache_dir is not None:
        fields = {'cache_dir': str(cache_dir), **fields}
    return tiny_config(**{'data_path': str(data_path), 'val_split': 0.2, **fields})


def small_config(save_dir, data_path, **overrides):
    """configs/tiny.py shrunk to seconds on a CPU, with the peak stated and no samples (tests
    that read either say so); overrides win."""
    return tiny_config(
        **{
            **dict(
                vocab_size=256,
                n_layers=2,
                d_model=64,
                n_heads=4,
                d_ff=128,
                ctx_len=32,
                dropout=0.0,
                batch_size=8,
                num_epochs=1,
                max_steps=6,
                warmup_steps=2,
                learning_rate=1e-3,
                log_every=2,
                eval_every=3,
                eval_batches=2,
                save_every=3,
                data_path=str(data_path),
                save_dir=str(save_dir),
                tokenizer_sample_size=20000,
                peak_flops_per_device=PEAK_FLOPS,
                sample_prompts='',
            ),
            **overrides,
        }
    )


# small_config as launcher flags (without data_path and save_dir; test_launch checks that they
# give the same config).
SMALL = [
    '--config.vocab_size=256',
    '--config.n_layers=2',
    '--config.d_model=64',
    '--config.n_heads=4',
    '--config.d_ff=128',
    '--config.ctx_len=32',
    '--config.dropout=0.0',
    '--config.batch_size=8',
    '--config.num_epochs=1',
    '--config.max_steps=6',
    '--config.warmup_steps=2',
    '--config.learning_rate=0.001',
    '--config.log_every=2',
    '--config.eval_every=3',
    '--config.eval_batches=2',
    '--config.save_every=3',
    '--config.tokenizer_sample_size=20000',
    f'--config.peak_flops_per_device={PEAK_FLOPS}',
    '--config.sample_prompts=',
]

# The resume tests' run: dropout on, a log interval cut by checkpoints (3 does not divide 2),
# evaluation in between.
RESUME_ARGS = [
    *SMALL,
    '--config.dropout=0.1',
    '--config.max_steps=12',
    '--config.log_every=3',
    '--config.save_every=2',
    '--config.eval_every=4',
]


def mixture_spec(folder, prose_weight=0.7, code_weight=0.3) -> str:
    """config.mixture of the two_sources fixture's folder."""
    return f'prose={folder / "prose.txt"}:{prose_weight},code={folder / "code.txt"}:{code_weight}'
