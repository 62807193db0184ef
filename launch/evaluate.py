"""Loss, perplexity and token count of a trained Thinker on any text file.

  python -m launch.evaluate --checkpoint_dir=checkpoints/cpu_demo --data_path=some.txt
      [--step=N] [--batch_size=16]

Every non-empty line is a document, tokenized with the checkpoint's tokenizer and packed into
windows of the model's ctx_len, exactly as training validates.
"""

from absl import app
from absl import flags

from launch import cli

_CHECKPOINT_DIR = flags.DEFINE_string('checkpoint_dir', None, 'save_dir of a training run.')
_DATA_PATH = flags.DEFINE_string('data_path', None, 'Text file, directory or glob to score.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the newest.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 16, 'Windows per evaluation batch.')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    import muomni_jax  # pylint: disable=import-outside-toplevel
    from muomni_jax import evaluation  # pylint: disable=import-outside-toplevel
    with cli.one_line_errors():
        ckpt = muomni_jax.load(_CHECKPOINT_DIR.value, _STEP.value)
        result = evaluation.evaluate_text(ckpt.model(), ckpt.tokenizer, _DATA_PATH.value,
                                          _BATCH_SIZE.value)
    print(f'Data: {_DATA_PATH.value} ({result["documents"]:,} documents)')
    print(f'Loss: {result["loss"]:.4f}')
    print(f'Perplexity: {result["perplexity"]:.2f}')
    print(f'Tokens: {result["tokens"]:,}')


if __name__ == '__main__':
    flags.mark_flags_as_required(['checkpoint_dir', 'data_path'])
    app.run(main)
