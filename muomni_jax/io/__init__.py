"""Where files live: local folders and gs:// behind one path layer, and whole-file writes a
crash cannot truncate.

May import: the standard library, etils, tensorstore (on use) and muomni_jax.errors.
"""
