"""Safetensors files read memory-mapped: the weights of a model share the page cache with
the content store's copy of the file, nothing is read until used, and no second copy is
made (``safetensors.torch.load_file`` reads every tensor into process memory)."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["MappedState", "check_shapes", "mmap_safetensors"]

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I8": torch.int8,
           "U8": torch.uint8, "I16": torch.int16, "BOOL": torch.bool}


class MappedState(dict[str, Tensor]):
    """A state whose tensors may view memory maps of their files. :meth:`release` drops
    the pages read so far from this process's resident memory (a trainer calls it once
    the model holds its own copy); a later read maps them in again from the page cache."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.maps: list[mmap.mmap] = []

    def adopt(self, other: MappedState) -> None:
        self.maps.extend(other.maps)

    def release(self) -> None:
        for m in self.maps:
            # MADV_DONTNEED on a private map that was never written: the pages go, the
            # file's content stays, and the next access faults it in again.
            with contextlib.suppress(OSError, ValueError, AttributeError):
                m.madvise(mmap.MADV_DONTNEED)


def mmap_safetensors(path: str | os.PathLike[str]) -> MappedState:
    """The tensors of a safetensors file as views of a private memory map of it.

    Written here rather than ``safetensors.torch.load_file`` because that one reads every
    tensor into process memory: a second copy of the weights next to the page cache. A
    private (copy-on-write) map is writable, so torch takes it without a warning, and the
    file itself is never changed. ValueError on a malformed file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError("file too short for a safetensors header")
        (hlen,) = struct.unpack("<Q", f.read(8))
        if hlen > min(size - 8, 100 << 20):
            raise ValueError("safetensors header longer than the file")
        try:
            header = json.loads(f.read(hlen))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"bad safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError("bad safetensors header")
        header.pop("__metadata__", None)
        buf: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + hlen else b""
    base = 8 + hlen
    out = MappedState()
    if isinstance(buf, mmap.mmap):
        out.maps.append(buf)
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r}: bad header entry") from None
        numel = 1
        for d in shape:
            numel *= d
        item = torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or end - start != numel * item or start < 0 \
                or base + end > size:
            raise ValueError(f"tensor {name!r}: offsets do not match its shape")
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=base + start)
        out[name] = t.reshape(shape)
    return out


def check_shapes(want: Mapping[str, tuple[int, ...]], state: Mapping[str, Tensor]) -> None:
    """ValueError naming the first missing, unexpected or misshapen tensor of ``state``
    against the names and shapes a model's config wants."""
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing:
        raise ValueError(f"model weights lack tensor {missing[0]!r} ({len(missing)} missing)")
    if extra:
        raise ValueError(f"model weights have unexpected tensor {extra[0]!r} ({len(extra)} extra)")
    for name, shape in want.items():
        got = tuple(state[name].shape)
        if got != shape:
            raise ValueError(f"tensor {name!r} has shape {list(got)}, config wants {list(shape)}")
