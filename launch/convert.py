"""Exchange Thinker weights with the original μOmni PyTorch format (shared/spec/thinker.md)
and with Hugging Face transformers (a LlamaForCausalLM, or MixtralForCausalLM for MoE).

Export a checkpoint step (the suffix picks the original's format; --format=hf, or a folder, a
Hugging Face one):
  python -m launch.convert --checkpoint_dir=checkpoints/cpu_demo --output=export/thinker.pt
  python -m launch.convert --checkpoint_dir=checkpoints/cpu_demo \
      --output=export/thinker.safetensors        # also writes export/config.json
  python -m launch.convert --checkpoint_dir=checkpoints/cpu_demo --output=export/hf --format=hf

Import the original's weights into a new save_dir (step 0, a fresh optimizer), ready for
launch.sample, launch.evaluate, the notebook, or launch.stage_a to train further:
  python -m launch.convert --input=thinker.pt --tokenizer=tokenizer.model \
      --save_dir=checkpoints/imported [--config=configs/tiny.py --config.n_heads=4]
  python -m launch.convert --input=export/hf --save_dir=checkpoints/from_hf  # a local HF folder

The weights' shapes give the model size; --config gives what they cannot (n_heads, rope_theta,
ctx_len) and the training fields; a safetensors file's or HF folder's config.json wins over it.
.pt files need torch (pip install torch==2.13.0); the HF format needs transformers
(pip install transformers==5.24.0); original safetensors files need neither.
"""

from absl import app, flags
from ml_collections import config_flags

from launch import cli
from muomni_jax.errors import UserError

_CHECKPOINT_DIR = flags.DEFINE_string('checkpoint_dir', None, 'Export: save_dir of a run.')
_STEP = flags.DEFINE_integer('step', None, 'Export: checkpoint step; default: the newest.')
_WEIGHTS = flags.DEFINE_enum(
    'weights',
    'auto',
    ['auto', 'params', 'ema'],
    'Export: auto is the moving average of the params where the run kept one (ema_decay).',
)
_OUTPUT = flags.DEFINE_string(
    'output', None, 'Export: a .pt or .safetensors file to write, or a folder with --format=hf.'
)
_FORMAT = flags.DEFINE_enum(
    'format',
    None,
    ['original', 'hf'],
    'Export: original (the default '
    'for a .pt/.safetensors output) or hf (a Hugging Face folder; the '
    'default for an output ending in / or an existing folder).',
)
_INPUT = flags.DEFINE_string(
    'input', None, 'Import: a .pt or .safetensors file, or a Hugging Face model folder, to read.'
)
_SAVE_DIR = flags.DEFINE_string('save_dir', None, 'Import: a new save_dir to create.')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'Import: the tokenizer.model of the weights.')
_CONFIG = config_flags.DEFINE_config_file(
    'config',
    None,
    'Import: a configs/*.py file for what the weights do not show (default: configs/tiny.py).',
    lock_config=False,
)


def _export():
    from muomni_jax.interop import original_checkpoints

    if not _OUTPUT.value:
        raise UserError(
            'exporting needs --output=FILE.pt, FILE.safetensors or, with --format=hf, a folder'
        )
    for path in original_checkpoints.export_checkpoint(
        _CHECKPOINT_DIR.value, _OUTPUT.value, _STEP.value, _FORMAT.value, _WEIGHTS.value
    ):
        print(f'Wrote {path}')


def _import():
    from muomni_jax.interop import original_checkpoints

    if not _SAVE_DIR.value:
        raise UserError('importing needs --save_dir=NEW_DIR')
    config = _CONFIG.value
    if config is None:
        from configs import tiny

        config = tiny.get_config()
    model_config = original_checkpoints.import_weights(
        _INPUT.value, _SAVE_DIR.value, _TOKENIZER.value, config
    )
    print(
        f'Imported a Thinker with n_layers={model_config.n_layers} '
        f'd_model={model_config.d_model} n_heads={model_config.n_heads} '
        f'kv_groups={model_config.kv_groups} vocab_size={model_config.vocab_size} '
        f'into {_SAVE_DIR.value} (step 0)'
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    with cli.one_line_errors():
        if bool(_CHECKPOINT_DIR.value) == bool(_INPUT.value):
            raise UserError('give either --checkpoint_dir (export) or --input (import)')
        if _CHECKPOINT_DIR.value:
            _export()
        else:
            _import()


if __name__ == '__main__':
    app.run(main)
