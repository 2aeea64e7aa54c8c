"""The torch side: the built-in byte-level GPT, DiLoCo training (inner steps, deltas,
checks, outer step), the standard-library corpus, and the environment probe (run in a
child process).

May import: torch, safetensors, numpy, protocol/; nothing of node/ outside node.ml.
"""
