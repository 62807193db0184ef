"""Generate text from a trained Thinker, and show what it predicts next.

  python -m launch.sample --checkpoint_dir=checkpoints/cpu_demo --prompt="The cat sat on the"
      [--prompt="Python is a" ...] [--max_new_tokens=50] [--temperature=0.8] [--top_k=40]
      [--top_p=0.95] [--seed=0] [--step=N] [--show_next=5]

--temperature=0 is greedy decoding.
"""

from absl import app, flags

from launch import cli

_CHECKPOINT_DIR = flags.DEFINE_string('checkpoint_dir', None, 'save_dir of a training run.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the newest.')
_WEIGHTS = flags.DEFINE_enum(
    'weights',
    'auto',
    ['auto', 'params', 'ema'],
    'auto: the moving average of the params where the run kept one (ema_decay), else the params.',
)
_PROMPT = flags.DEFINE_multi_string('prompt', None, 'Text to continue; repeat for a batch.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 50, 'Tokens to generate at most.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample from the k most likely tokens; 0: all.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sample from the smallest set with this probability.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed: the same seed gives the same text.')
_SHOW_NEXT = flags.DEFINE_integer(
    'show_next', 5, 'Also print the k most likely next tokens of each prompt; 0 to skip.'
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    import muomni_jax
    from muomni_jax.inference import sampling

    with cli.one_line_errors():
        ckpt = muomni_jax.load(_CHECKPOINT_DIR.value, _STEP.value, weights=_WEIGHTS.value)
        model = ckpt.model()
        prompts = _PROMPT.value
        texts = sampling.generate(
            model,
            ckpt.tokenizer,
            prompts,
            max_new_tokens=_MAX_NEW_TOKENS.value,
            temperature=_TEMPERATURE.value,
            top_k=_TOP_K.value,
            top_p=_TOP_P.value,
            seed=_SEED.value,
        )
        for prompt, text in zip(prompts, texts):
            if _SHOW_NEXT.value > 0:
                top = sampling.next_token_distribution(
                    model, ckpt.tokenizer, prompt, _SHOW_NEXT.value
                )
                print(f'Context: {prompt!r}')
                print('Next token: ' + ', '.join(f'{c.text!r} {c.probability:.0%}' for c in top))
            print(f'Generated: {prompt}{text}')
            print()


if __name__ == '__main__':
    flags.mark_flags_as_required(['checkpoint_dir', 'prompt'])
    app.run(main)
