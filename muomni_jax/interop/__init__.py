"""Other formats and frameworks: the original μOmni's .pt and .safetensors files, Hugging Face
Llama and Mixtral folders, lm-eval-harness, and a PyTorch Thinker written from the spec.

May import: every layer below it (up to training, whose checkpoint writer an import uses).
torch, transformers and lm-eval are imported only where they are used.
"""
