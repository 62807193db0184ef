"""Thinkers for comparisons: weights at a scale where mistakes show, and one compiled forward."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from muomni_jax.model.thinker import abstract_model


def perturbed_model(config, seed: int = 0) -> nnx.Module:
    """A Thinker whose every param is O(1)-scale random, so a comparison is not dominated by
    the init's scales or its ones and zeros: embeddings N(0, 1), kernels N(0, 1/fan_in), norm
    gains 1 + 0.2 N(0, 1), biases 0.1 N(0, 1). Filled from numpy: no initialization through
    JAX, which compiles op by op (seconds per model)."""
    graphdef, abstract = abstract_model(config)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = path[-1].key
        if name == 'weight':  # RMSNorm gains
            value = 1.0 + 0.2 * rng.standard_normal(x.shape)
        elif name == 'embedding':
            value = rng.standard_normal(x.shape)
        elif name == 'bias':
            value = 0.1 * rng.standard_normal(x.shape)
        else:
            value = rng.standard_normal(x.shape) / np.sqrt(x.shape[0])
        return jnp.asarray(value, jnp.float32)

    values = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(abstract, values)
    return nnx.merge(graphdef, abstract)


@jax.jit
def forward(model, tokens):
    """model(tokens), compiled: logits (batch, length, vocab) of tokens (batch, length)."""
    return model(tokens)
