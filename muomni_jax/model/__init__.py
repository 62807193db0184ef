"""The Thinker: its layers, its next-token loss (plain and fused), its FLOPs, and the
forward-only functions that training and inference share (`lm_loss.eval_step`,
`lm_loss.perplexity`, `thinker.abstract_model`).

May import: jax, flax, optax, muomni_jax.errors and muomni_jax.parallel. Knows nothing of files,
configs on disk or data.
"""
