"""Training the Thinker: the config checks, the pure steps and optimizer, the loop and its
periodic actions, checkpoints, signals and time budgets, and what a run reports.

May import: every layer below it (errors, io, parallel, model, data, inference).
"""
