"""Loss, perplexity and token count of a trained Thinker on any text file, or lm-eval tasks.

  python -m launch.evaluate --checkpoint_dir=checkpoints/cpu_demo --data_path=some.txt
      [--step=N] [--batch_size=16]

Every non-empty line is a document, tokenized with the checkpoint's tokenizer and packed into
windows of the model's ctx_len, exactly as training validates.

  python -m launch.evaluate --checkpoint_dir=checkpoints/cpu_demo --lm_eval_tasks=hellaswag,arc_easy
      [--lm_eval_limit=100] [--lm_eval_include_path=my_tasks/]

runs lm-eval-harness tasks on the JAX model itself, no export needed (pip install
"lm-eval==0.4.13"; lm-eval downloads the task data).
"""

from absl import app, flags

from launch import cli
from muomni_jax.errors import UserError

_CHECKPOINT_DIR = flags.DEFINE_string('checkpoint_dir', None, 'save_dir of a training run.')
_DATA_PATH = flags.DEFINE_string('data_path', None, 'Text file, directory or glob to score.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the newest.')
_WEIGHTS = flags.DEFINE_enum(
    'weights',
    'auto',
    ['auto', 'params', 'ema'],
    'auto: the moving average of the params where the run kept one (ema_decay), else the params.',
)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 16, 'Windows (or lm-eval requests) per batch.')
_LM_EVAL_TASKS = flags.DEFINE_list(
    'lm_eval_tasks', [], 'lm-eval-harness tasks to run instead of scoring --data_path.'
)
_LM_EVAL_INCLUDE_PATH = flags.DEFINE_string(
    'lm_eval_include_path', None, 'A folder of extra lm-eval task YAML files.'
)
_LM_EVAL_LIMIT = flags.DEFINE_integer(
    'lm_eval_limit', None, 'At most this many documents per lm-eval task.'
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    import muomni_jax
    from muomni_jax.inference import evaluation

    with cli.one_line_errors():
        if bool(_DATA_PATH.value) == bool(_LM_EVAL_TASKS.value):
            raise UserError('give either --data_path (a text to score) or --lm_eval_tasks')
        ckpt = muomni_jax.load(_CHECKPOINT_DIR.value, _STEP.value, weights=_WEIGHTS.value)
        if _LM_EVAL_TASKS.value:
            from muomni_jax.interop import lm_eval_model

            results = lm_eval_model.evaluate_tasks(
                ckpt.model(),
                ckpt.tokenizer,
                _LM_EVAL_TASKS.value,
                include_path=_LM_EVAL_INCLUDE_PATH.value,
                limit=_LM_EVAL_LIMIT.value,
                batch_size=_BATCH_SIZE.value,
            )
            print(lm_eval_model.results_table(results))
            return
        result = evaluation.evaluate_text(
            ckpt.model(), ckpt.tokenizer, _DATA_PATH.value, _BATCH_SIZE.value
        )
    print(f'Data: {_DATA_PATH.value} ({result["documents"]:,} documents)')
    print(f'Loss: {result["loss"]:.4f}')
    print(f'Perplexity: {result["perplexity"]:.2f}')
    print(f'Tokens: {result["tokens"]:,}')


if __name__ == '__main__':
    flags.mark_flags_as_required(['checkpoint_dir'])
    app.run(main)
