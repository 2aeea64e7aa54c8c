"""Text corpora for the byte-level GPT: a token is one raw byte, so any file is a dataset.

The default dataset is built from the installed Python standard library's own ``.py``
sources: real text, present on every machine, nothing to download. The files are read in
a seeded shuffle of their sorted relative paths, so that any contiguous slice of the
corpus (what a worker is handed) mixes many modules instead of, say, all of ``email/``.

The corpus is deterministic on one machine (same Python install, same bytes). Two machines
with different Python builds get different corpora: a job names its dataset by content hash
(SMIP), so the coordinator publishes the corpus it built and workers fetch those bytes.

Splits are by position: the held-out split is the LAST ``heldout_fraction`` of the bytes,
the training split everything before it.

Public API::

    build_stdlib_corpus(out_path, *, seed=0, include_tests=False) -> CorpusStats
    load_tokens(path_or_paths) -> numpy uint8 array (a memmap for one file)
    as_torch(tokens) -> torch uint8 tensor (shares the memory where it can)
    split(n_bytes, heldout_fraction) -> (train_len, heldout_start)
"""

from __future__ import annotations

import dataclasses
import os
import random
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SEPARATOR",
    "CorpusStats",
    "as_torch",
    "build_stdlib_corpus",
    "load_tokens",
    "split",
    "stdlib_files",
]

# Between two files: newline, ASCII "file separator" (0x1c), newline. A byte that never
# occurs in source text, so the model can learn where a file ends and the next begins.
SEPARATOR = b"\n\x1c\n"
# Directories left out: installed third-party packages are not the standard library, and
# the test suites (19 MB of the 31 MB in CPython 3.11) would make the corpus mostly tests.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
# Machine-generated build data (paths and compiler flags of this one build).
SKIP_PREFIXES = ("_sysconfigdata",)


@dataclasses.dataclass(frozen=True)
class CorpusStats:
    bytes: int
    files: int
    stdlib: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def stdlib_files(root: str | os.PathLike[str], *, include_tests: bool = False) -> list[str]:
    """Relative paths (``/``-separated) of the ``.py`` files under ``root``, sorted."""
    root = Path(root)
    skip = SKIP_DIRS if include_tests else SKIP_DIRS | TEST_DIRS
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruned in place so os.walk does not descend; sorted only for tidiness (the final
        # list is sorted anyway).
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        rel = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.endswith(".py") and not name.startswith(SKIP_PREFIXES):
                out.append((rel / name).as_posix())
    return sorted(out)


def build_stdlib_corpus(out_path: str | os.PathLike[str], *, seed: int = 0,
                        include_tests: bool = False) -> CorpusStats:
    """Write the standard-library corpus to ``out_path`` (temp name, then rename) and return
    its size. 12.1 MB from 733 files on CPython 3.11.7 without the test suites."""
    root = sysconfig.get_paths()["stdlib"]
    files = stdlib_files(root, include_tests=include_tests)
    if not files:
        raise ValueError(f"no .py files found under {root}")
    random.Random(seed).shuffle(files)  # a seeded shuffle of the sorted list: deterministic
    out = Path(out_path)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    total = 0
    with open(tmp, "wb") as f:
        for i, rel in enumerate(files):
            data = Path(root, rel).read_bytes()
            if i:
                f.write(SEPARATOR)
                total += len(SEPARATOR)
            f.write(data)
            total += len(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return CorpusStats(bytes=total, files=len(files), stdlib=str(root))


class Concat:
    """Several memory-mapped files read as one array, without loading them: ``len``, and
    indexing by an integer array (the windows a batch reads) or a slice. numpy has no
    view over several maps, hence this small index (a sorted table of file offsets)."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = list(parts)
        self.ends = np.cumsum([len(p) for p in self.parts])
        self.dtype = self.parts[0].dtype if self.parts else np.dtype(np.uint8)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(len(self)))
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError("index outside the data")
        which = np.searchsorted(self.ends, idx, side="right")
        starts = np.concatenate([[0], self.ends[:-1]])
        out = np.empty(idx.shape, dtype=self.dtype)
        for f in np.unique(which):
            sel = which == f
            out[sel] = self.parts[f][idx[sel] - starts[f]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = np.concatenate([np.asarray(p) for p in self.parts])  # for small data only
        return whole if dtype is None else whole.astype(dtype)

    def __bytes__(self) -> bytes:
        return b"".join(bytes(p) for p in self.parts)


def load_tokens(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> Any:
    """The byte stream of one file (a read-only memmap: nothing is read until used) or of
    several files concatenated in the given order (a :class:`Concat` over their memmaps:
    read in windows too, never loaded whole)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    arrays = []
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            arrays.append(np.zeros(0, dtype=np.uint8))
        else:
            arrays.append(np.memmap(p, dtype=np.uint8, mode="r"))
    if not arrays:
        raise ValueError("no data files")
    if len(arrays) == 1:
        return arrays[0]
    return Concat([a for a in arrays if len(a)])


def as_torch(tokens: Any) -> Any:
    """A torch uint8 tensor over ``tokens`` (imports torch only when called)."""
    import torch

    if isinstance(tokens, torch.Tensor):
        return tokens
    arr = np.asarray(tokens, dtype=np.uint8)
    if not arr.flags.writeable:  # torch warns on read-only memory; a copy is 12 MB
        arr = np.array(arr)
    return torch.from_numpy(arr)


def split(n_bytes: int, heldout_fraction: float) -> tuple[int, int]:
    """(train_len, heldout_start): training is bytes [0, train_len), held-out is
    [heldout_start, n_bytes), with heldout_start == train_len."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be positive, got {n_bytes!r}")
    heldout = max(1, round(n_bytes * heldout_fraction))
    start = n_bytes - heldout
    return start, start
