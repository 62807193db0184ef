"""muomni-jax: Stage A of μOmni (the Thinker) in JAX.

The public face, for notebooks and later μOmni stages:
  muomni_jax.load(checkpoint_dir, step=None, weights='auto') -> Checkpoint (config, params,
      tokenizer; .model()); weights='auto' gives the params' moving average where the run kept
      one (ema_decay), 'params' the trained params
  muomni_jax.generate(model, tokenizer, prompts, ...) -> continuations (KV-cache sampling)
  muomni_jax.next_token_distribution(model, tokenizer, prompt, k=5) -> most likely next tokens
  muomni_jax.plot_runs(checkpoint_dirs, output_path=None) -> matplotlib Figure of the curves

The package is in layers, each importing only those below it (tests/test_layers.py checks):
errors, io, parallel, model, data, inference, training, interop. The benchmarks and the
device check live beside the package, in benchmarks/.
"""

# name -> (module, attribute). Resolved lazily, so `import muomni_jax` costs nothing and
# `muomni_jax.load` pays only for what loading needs.
_PUBLIC = {
    'load': ('muomni_jax.inference.loading', 'load'),
    'generate': ('muomni_jax.inference.sampling', 'generate'),
    'next_token_distribution': ('muomni_jax.inference.sampling', 'next_token_distribution'),
    'plot_runs': ('muomni_jax.inference.plotting', 'plot_runs'),
}


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        module, attribute = _PUBLIC[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted([*globals(), *_PUBLIC])
