"""The torch side: the built-in byte-level GPT, DiLoCo training (inner steps, deltas,
checks, outer step), the standard-library corpus, the environment probe (run in a child
process), and adversary (TEST ONLY: the deltas cheating workers send).

May import: torch, safetensors, numpy, protocol/; nothing of node/ outside node.ml.
"""
