"""Minimal streaming reader and writer for the safetensors format (no pickle anywhere).

Format: 8-byte little-endian header length N, then N bytes of JSON
`{name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw little-endian tensor bytes (offsets relative to the end of the header).

Reading memory-maps the file and returns one tensor at a time, so loading a model never holds more
than the tensor being converted on the host. bf16 is handled through `ml_dtypes`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np

from memagent_jax.errors import UserError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(UserError):
    """A checkpoint folder is incomplete, does not match its config, or holds a malformed weight file (the message
    names the file and the tensor). Exported as `memagent_jax.models.CheckpointError`."""


class SafetensorsError(CheckpointError):
    """A safetensors file is malformed (cut short, a header that lies about its tensors) or lacks a tensor."""


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsFile:
    """A read-only, memory-mapped safetensors file: `names()`, `shape(name)`, `read(name)`.

    The whole header is checked when the file is opened, so a file cut short or a header that lies (offsets past
    the end of the file or overlapping, a byte range that does not match the tensor's dtype and shape) raises
    SafetensorsError naming the file and the tensor before any tensor is read."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) != 8:
                    raise SafetensorsError(
                        f"{path}: too short to be a safetensors file ({size} bytes; cut short while copying?)"
                    )
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > size - 8:
                    raise SafetensorsError(
                        f"{path}: header length {header_len} is larger than the rest of the file ({size - 8} bytes): "
                        "the file is cut short or not a safetensors file"
                    )
                if header_len > _MAX_HEADER:
                    raise SafetensorsError(f"{path}: header length {header_len} is not plausible (over {_MAX_HEADER})")
                header = json.loads(f.read(header_len))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: cannot read safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{path}: header is not a JSON object")
        metadata = header.pop("__metadata__", {}) or {}
        if not isinstance(metadata, dict):
            raise SafetensorsError(f"{path}: header field '__metadata__' is not a JSON object")
        self.metadata = metadata
        self._entries = header
        self._data_start = 8 + header_len
        self._size = size
        self._mmap = None
        self._check_layout()

    def _check_layout(self) -> None:
        """Every entry well-formed, its bytes inside the file, no two tensors sharing bytes."""
        data_size = self._size - self._data_start
        spans = []
        for name, entry in self._entries.items():
            where = f"{self.path}: tensor {name!r}"
            if not isinstance(entry, dict):
                raise SafetensorsError(f"{where}: header entry is not a JSON object")
            shape, offsets, dtype = entry.get("shape"), entry.get("data_offsets"), entry.get("dtype")
            if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
                raise SafetensorsError(f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
                raise SafetensorsError(f"{where}: 'data_offsets' must be [begin, end] byte offsets, got {offsets!r}")
            begin, end = offsets
            if end < begin:
                raise SafetensorsError(f"{where}: 'data_offsets' [{begin}, {end}) ends before it begins")
            if end > data_size:
                raise SafetensorsError(
                    f"{where}: byte range [{begin}, {end}) runs past the end of the file ({data_size} data bytes): "
                    "the file is cut short or its header is wrong"
                )
            if dtype in _DTYPES:  # other dtypes are refused when read (`_entry`)
                nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
                if end - begin != nbytes:
                    raise SafetensorsError(
                        f"{where}: byte range [{begin}, {end}) holds {end - begin} bytes, but shape {tuple(shape)} "
                        f"of {dtype} needs {nbytes}"
                    )
            spans.append((begin, end, name))
        last_end, last = 0, None  # the furthest-reaching tensor so far
        for begin, end, name in sorted(spans):
            if begin == end:  # an empty tensor shares no bytes
                continue
            if begin < last_end:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} (bytes [{begin}, {end})) overlaps tensor {last!r} (bytes up to "
                    f"{last_end}): the header is wrong"
                )
            last_end, last = end, name

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str):
        try:
            entry = self._entries[name]
        except KeyError:
            raise SafetensorsError(f"{self.path}: no tensor named {name!r}") from None
        dtype = entry.get("dtype")
        if dtype not in _DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype!r}")
        return _DTYPES[dtype], tuple(entry["shape"]), tuple(entry["data_offsets"])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[0]

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view into the memory map (copy or cast before mutating)."""
        dtype, shape, (begin, end) = self._entry(name)  # the layout was checked when the file was opened
        try:
            if self._mmap is None:
                self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
            if self._mmap.size != self._size:
                raise ValueError(f"the file changed size since it was opened ({self._size} -> {self._mmap.size} bytes)")
            raw = self._mmap[self._data_start + begin : self._data_start + end]
            return raw.view(dtype).reshape(shape)
        except (OSError, ValueError) as e:  # the file changed or vanished after it was opened
            raise SafetensorsError(f"{self.path}: tensor {name!r} cannot be read: {e}") from None


def dtype_name(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype not in _NAMES:
        raise SafetensorsError(f"cannot store dtype {dtype} in safetensors")
    return _NAMES[dtype]


def write_safetensors(
    path: str,
    specs: list[tuple[str, tuple[int, ...], np.dtype]],
    tensors: Iterable[tuple[str, np.ndarray]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes a safetensors file whose layout is fixed up front by `specs` (name, shape, dtype).

    `tensors` yields (name, array) in the same order as `specs`; each is written as it arrives, so only
    one tensor needs to be in host memory at a time.
    """
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        expected = iter(specs)
        for name, array in tensors:
            spec_name, shape, dtype = next(expected)
            if name != spec_name or tuple(array.shape) != tuple(shape) or np.dtype(array.dtype) != np.dtype(dtype):
                raise SafetensorsError(
                    f"{path}: tensor {name!r} {array.shape} {array.dtype} does not match planned "
                    f"{spec_name!r} {shape} {np.dtype(dtype)}"
                )
            f.write(np.ascontiguousarray(array).tobytes())
        leftover = next(expected, None)
        if leftover is not None:
            raise SafetensorsError(f"{path}: tensor {leftover[0]!r} was planned but never written")


def iter_names(files: Iterable[SafetensorsFile]) -> Iterator[tuple[str, SafetensorsFile]]:
    for f in files:
        for name in f.names():
            yield name, f
