"""The device mesh, how arrays are laid out on it, and the processes of a multi-host run.

May import: jax and muomni_jax.errors. Knows nothing of the model or the data.
"""
