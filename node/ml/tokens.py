"""Tokenizers for Hugging Face models, and datasets tokenized once per (dataset, tokenizer).

A tokenizer is a ``tokenizer.json`` built with the ``tokenizers`` library: a byte-level BPE
whose 256 base tokens are the byte values (GPT-2's byte-to-unicode alphabet), either with no
merges (a byte tokenizer: any text, no training) or with merges trained on a dataset.
Special tokens: ``<|endoftext|>`` only (begin, end and padding of text).

The tokens of a dataset are a flat array (uint16 when the vocabulary fits, else uint32),
written once to ``<cache>/<key>.u16`` (or ``.u32``), where ``key`` is the sha256 of the
tokenizer file and of the data files' content ids: the same dataset and tokenizer give the
same file on every node, and another tokenizer can never read a stale one. The data files
are read in windows (``WINDOW_BYTES``) and the tokens streamed to the file, so tokenizing a
dataset of any size takes bounded memory; the tokens are then read memory-mapped.

``tokenizers`` is imported only where a tokenizer is built or used.

Public API::

    EOT, byte_tokenizer() / train_bpe(files, vocab_size) -> tokenizers.Tokenizer
    save_tokenizer(tok, out_dir, model_max_length)   # tokenizer.json + tokenizer_config.json
    cache_key(tokenizer_file, data_files) -> hex
    tokenized(tokenizer_file, data_files, cache_dir) -> numpy memmap of token ids
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EOT",
    "TOKENIZER_CONFIG_FILE",
    "TOKENIZER_FILE",
    "byte_tokenizer",
    "cache_key",
    "content_id",
    "save_tokenizer",
    "tokenized",
    "train_bpe",
]

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
WINDOW_BYTES = 1 << 20  # data read and tokenized this much at a time
KEY_VERSION = b"iollm-tokens-v1"  # bump when the tokenization of a window changes
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _byte_level() -> tuple[Any, Any]:
    from tokenizers import decoders, pre_tokenizers

    # add_prefix_space off: a text's tokens are then exactly its bytes' (no invented space);
    # use_regex on: merges never cross a word boundary, as GPT-2's.
    return pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()


def byte_tokenizer() -> Any:
    """A tokenizer whose tokens are the 256 byte values (ids 0..255, in byte order) and
    ``<|endoftext|>`` (256): a BPE with no merges over the byte-level alphabet."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    # ByteLevel's alphabet maps each byte to one printable character; id = byte value.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = _bytes_to_unicode()
    assert sorted(alphabet) == sorted(byte_chars.values())
    vocab = {byte_chars[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = _byte_level()
    tok.add_special_tokens([EOT])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of ByteLevel),
    written out because ``tokenizers`` exposes the alphabet only as an unordered list."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _windows(files: Sequence[str | os.PathLike[str]]) -> Iterator[str]:
    """The files' text in windows of about WINDOW_BYTES, each cut after a newline (so a
    window boundary never splits a word, and the tokens do not depend on anything but the
    bytes), decoded as UTF-8 with invalid bytes replaced."""
    for path in files:
        with open(path, "rb") as f:
            carry = b""
            while True:
                block = f.read(WINDOW_BYTES)
                if not block:
                    break
                data = carry + block
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    cut = len(data) if len(data) >= 4 * WINDOW_BYTES else 0
                carry, data = data[cut:], data[:cut]
                if data:
                    yield data.decode("utf-8", errors="replace")
            if carry:
                yield carry.decode("utf-8", errors="replace")


def train_bpe(files: Sequence[str | os.PathLike[str]], vocab_size: int) -> Any:
    """A byte-level BPE of ``vocab_size`` tokens (256 bytes, ``<|endoftext|>``, merges)
    trained on the files (read in windows)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if not 258 <= vocab_size <= 1 << 20:
        raise ValueError(f"vocab_size {vocab_size}: between 258 and {1 << 20}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = _byte_level()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_windows(files), trainer=trainer)
    return tok


def save_tokenizer(tok: Any, out_dir: str | os.PathLike[str], model_max_length: int) -> None:
    """``tokenizer.json`` and the ``tokenizer_config.json`` that lets
    ``transformers.AutoTokenizer.from_pretrained(out_dir)`` load it. Sorted JSON: the bytes
    are a function of the tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    obj = json.loads(tok.to_str())
    (out / TOKENIZER_FILE).write_text(json.dumps(obj, sort_keys=True, ensure_ascii=False,
                                                 indent=1) + "\n", encoding="utf-8")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
           "pad_token": EOT, "unk_token": None, "model_max_length": model_max_length,
           "clean_up_tokenization_spaces": False}
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(cfg, sort_keys=True, indent=1) + "\n",
                                             encoding="utf-8")


def vocab_size(tokenizer_file: str | os.PathLike[str]) -> int:
    from tokenizers import Tokenizer

    return int(Tokenizer.from_file(str(tokenizer_file)).get_vocab_size(with_added_tokens=True))


def content_id(path: str | os.PathLike[str]) -> str:
    """A data file's content id: its name when it is a content-store shard (named by its
    verified root hash), else the sha256 of its bytes."""
    p = Path(path)
    if _HEX64.fullmatch(p.name) and p.parent.name == "shards":
        return p.name
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(WINDOW_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(tokenizer_file: str | os.PathLike[str],
              data_files: Sequence[str | os.PathLike[str]]) -> str:
    h = hashlib.sha256(KEY_VERSION)
    h.update(hashlib.sha256(Path(tokenizer_file).read_bytes()).digest())
    for f in data_files:
        h.update(bytes.fromhex(content_id(f)))
    return h.hexdigest()


def tokenized(tokenizer_file: str | os.PathLike[str],
              data_files: Sequence[str | os.PathLike[str]],
              cache_dir: str | os.PathLike[str],
              progress: Any = None) -> np.ndarray:
    """The token ids of the data files concatenated (an ``<|endoftext|>`` between two
    files), memory-mapped from the cache, tokenizing them first when not cached. Two
    processes that tokenize at once both write a temporary file; the last rename wins and
    both files are identical."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    cache = Path(cache_dir)
    suffix = "u16" if dtype == np.uint16 else "u32"
    path = cache / f"{cache_key(tokenizer_file, data_files)}.{suffix}"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        eot = tok.token_to_id(EOT)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        total = 0
        with open(tmp, "wb") as out:
            for i, f in enumerate(data_files):
                if i and eot is not None:
                    out.write(np.array([eot], dtype=dtype).tobytes())
                    total += 1
                for text in _windows([f]):
                    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=dtype)
                    out.write(ids.tobytes())
                    total += len(ids)
                    if progress is not None:
                        progress(total)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")
