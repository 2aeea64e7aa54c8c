"""The model architectures and sizes ``iollm model init`` offers, without importing torch
(the daemon and the CLI check a request against these; node/ml/hf.py builds them).
"""

from __future__ import annotations

__all__ = ["GPT_SIZES", "HF_ARCHS", "HF_SIZES", "TOKENIZERS", "is_trainable_config"]

GPT_SIZES = ("tiny", "small")
# iollm's names -> transformers' model_type: the ones ``model init`` makes. A job may
# train any causal LM that transformers builds from its config, not only these.
HF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gpt2": "gpt2"}
# (layers, hidden, heads, kv heads, intermediate, context). tiny: ~0.1M parameters plus
# the embeddings, seconds on a CPU core (tests); small: a few million; 125m: GPT-2 small's
# shape (12 x 768, 4x MLP), 85M parameters in the blocks plus vocab x 768 for embeddings.
HF_SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (2, 64, 4, 2, 176, 256),
    "small": (6, 256, 8, 4, 704, 512),
    "125m": (12, 768, 12, 12, 3072, 1024),
}
TOKENIZERS = ("byte", "bpe")  # byte: 256 byte tokens; bpe: byte-level BPE trained on data


def is_trainable_config(config: object) -> str:
    """Why a model of this config.json cannot be a job's base ("" when it can): the
    built-in GPT, or a Hugging Face config (its model_type is checked by the workers,
    which build it with transformers)."""
    if not isinstance(config, dict):
        return "config.json is not an object"
    if config.get("architecture") == "gpt":
        return ""
    if isinstance(config.get("model_type"), str):
        return ""
    return (f"architecture {config.get('architecture')!r} cannot be trained here; workers "
            "train the built-in 'gpt' or a Hugging Face model (config.json with model_type)")


def context_length(config: dict[str, object]) -> int | None:
    """The longest sequence the model takes, when its config says."""
    for key in ("block_size", "max_position_embeddings", "n_positions"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
