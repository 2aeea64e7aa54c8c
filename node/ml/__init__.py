"""The torch side: the built-in byte-level GPT, Hugging Face causal LMs (hf, built by
transformers from their config), tokenizers and tokenized datasets (tokens), memory-mapped
weights (weights), devices and precision (device), DiLoCo training (inner steps, deltas,
checks, outer step), the standard-library corpus, and the environment probe (run in a
child process). catalog.py is the one module here that imports no torch (the daemon and
the CLI read it).

May import: torch, safetensors, numpy, transformers and tokenizers (lazily), protocol/;
nothing of node/ outside node.ml.
"""
