"""A small, fast GGUF parser: metadata as Python values and tensors as memory-mapped bytes.

gguf-py's GGUFReader builds a numpy view for every string of the tokenizer (about 3 s for a
49k-token vocabulary); this reads the same file in a few tenths of a second. The format:
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# Metadata value types: struct format of the scalars; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_LENGTH = struct.Struct("<Q")


@dataclass
class TensorInfo:
    """One tensor: its name, GGML type, shape in PyTorch order, and raw bytes (a view of the file)."""

    name: str
    tensor_type: int
    shape: tuple[int, ...]
    data: np.ndarray
    file: mmap.mmap | None = None
    offset: int = 0

    def release(self) -> None:
        """Drop this tensor's pages of the mapped file from memory once it has been copied out (lower peak RSS)."""
        if self.file is not None and hasattr(mmap, "MADV_DONTNEED"):
            start = self.offset // mmap.PAGESIZE * mmap.PAGESIZE
            self.file.madvise(mmap.MADV_DONTNEED, start, self.offset + self.data.nbytes - start)


class GGUFParseError(ValueError):
    """The bytes are not a well-formed GGUF file."""


class UnsupportedGGUFVersion(GGUFParseError):
    """A GGUF file of a version other than 2 or 3 (the versions this parser reads)."""


def read_gguf(path: Path) -> tuple[dict, list[TensorInfo]]:
    """Parse a GGUF file: (metadata dict, tensors whose data are read-only views of the mapped file)."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _Parser(buf).parse()
    except (struct.error, IndexError, UnicodeDecodeError, OverflowError) as e:
        raise GGUFParseError(f"{type(e).__name__}: {e}") from None


class _Parser:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0
        self.view = memoryview(buf)

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise GGUFParseError(f"a string of {n} bytes runs past the end of the file")
        s = str(self.view[self.pos:self.pos + n], "utf-8")
        self.pos += n
        return s

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise GGUFParseError(f"unknown metadata value type {kind}")
        item, count = self.take("I"), self.take("Q")
        if item in _SCALARS:  # numbers: one numpy read instead of a Python loop
            dtype = np.dtype("<" + _SCALARS[item])
            end = self.pos + count * dtype.itemsize
            if end > len(self.buf):
                raise GGUFParseError(f"an array of {count} values runs past the end of the file")
            out = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
            self.pos = end
            return out
        if item == _STRING:
            return self.strings(count)
        return [self.value(item) for _ in range(count)]

    def strings(self, count: int) -> list[str]:
        # A vocabulary's array of strings (262k for Gemma) in one tight loop: twice as fast as string() each.
        unpack, buf, view, pos, size, out = _LENGTH.unpack_from, self.buf, self.view, self.pos, len(self.buf), []
        for _ in range(count):
            start = pos + 8
            pos = start + unpack(buf, start - 8)[0]
            if pos > size:
                raise GGUFParseError(f"a string of {pos - start} bytes runs past the end of the file")
            out.append(str(view[start:pos], "utf-8"))
        self.pos = pos
        return out

    def parse(self) -> tuple[dict, list[TensorInfo]]:
        if self.buf[:4] != b"GGUF":
            raise GGUFParseError("it does not start with b'GGUF'")
        self.pos = 4
        version = self.take("I")
        if version not in (2, 3):  # v1 had 32-bit counts; a later version may change the layout again
            endian = " (a big-endian file?)" if version in (2 << 24, 3 << 24) else ""
            raise UnsupportedGGUFVersion(f"GGUF version {version}{endian} is not supported (2 and 3 are)")
        n_tensors, n_kv = self.take("Q"), self.take("Q")
        metadata = {}
        for _ in range(n_kv):
            key = self.string()
            metadata[key] = self.value(self.take("I"))
        infos = []
        for _ in range(n_tensors):
            name = self.string()
            dims = [self.take("Q") for _ in range(self.take("I"))]
            infos.append((name, self.take("I"), tuple(reversed(dims)), self.take("Q")))
        align = metadata.get("general.alignment", 32)
        start = -(-self.pos // align) * align
        tensors = []
        for name, kind, shape, offset in infos:
            if kind not in GGML_QUANT_SIZES:
                raise GGUFParseError(f"tensor {name} has an unknown type {kind}")
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            n = int(np.prod(shape, dtype=np.int64))
            nbytes = n // block * size
            begin = start + offset
            if begin + nbytes > len(self.buf):
                raise GGUFParseError(f"tensor {name} ends at byte {begin + nbytes}, past the end of the file "
                                     f"({len(self.buf)} bytes): the file is truncated")
            data = np.frombuffer(self.buf, np.uint8, nbytes, begin)
            tensors.append(TensorInfo(name, kind, shape, data, self.buf, begin))
        return metadata, tensors
