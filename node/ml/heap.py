"""Freed memory handed back to the operating system (glibc's ``mallopt`` and
``malloc_trim``).

glibc keeps the memory of freed tensors in its heaps for reuse, and a heap only shrinks
from its top: after a training step the activations', gradients' and moments' pages stay
resident although free, and whatever the process touches next (the base weights' pages
when the delta is made) comes on top of them. ``malloc_trim(0)`` returns every free page
of every heap (madvise on the free chunks in the middle too). No library wraps it; it is
one ctypes call, a no-op where the C library has no such function (musl, macOS).

Trimming after the fact is not enough inside a training step: glibc raises its mmap
threshold to the size of every large block it frees (up to 32 MiB), so after the first
step the activations (a few MiB each) come from the heaps and fragment them. A fixed
threshold (:func:`large_blocks_mapped`) keeps every block of 256 KiB or more in its own
mapping, returned to the system the moment it is freed: on a 125M Llama at batch 8 x 256
the training child's peak went from 1998 to 1429 MiB (bench/RESULTS.md, issue 19). The
price is a page fault and a zeroed page for every page of every such block (6.5x the
minor faults, about a fifth more CPU time training a small Llama), so node/jobs/taskproc.py
sets it for jobs in the lean memory mode only.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

__all__ = ["MMAP_THRESHOLD", "large_blocks_mapped", "trim"]

MMAP_THRESHOLD = 256 << 10  # bytes: blocks this large get their own mapping
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


@functools.cache
def _libc(name: str, *argtypes: type) -> Callable[..., int] | None:
    try:
        # The C library this process already has loaded: no ldconfig subprocess, as
        # ctypes.util.find_library would start in every task child.
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


def large_blocks_mapped(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (no dynamic raise) for this process; True if set."""
    fn = _libc("mallopt", ctypes.c_int, ctypes.c_int)
    return bool(fn(_M_MMAP_THRESHOLD, threshold)) if fn is not None else False


def trim() -> bool:
    """Return the free pages of the C heap to the system; True when some were."""
    fn = _libc("malloc_trim", ctypes.c_size_t)
    return bool(fn(0)) if fn is not None else False
