"""Stream tensors out of a `.safetensors` file straight into their final dtype and device.

Why not `safetensors.safe_open(...).get_tensor`? It hands back tensors backed by a memory map
of the file. Converting them (float32 -> bfloat16, or to CUDA) then holds the mapped pages and
the converted copy at once, about 3x the loaded weights at peak, and weights that stay mapped
change under the model if the file is overwritten (for instance when a fine-tune saves into the
directory it loaded from). This reader parses the (simple, documented) safetensors header
itself, validates every entry against the file size, and reads each tensor in bounded chunks
into memory the model owns, so peak memory is the loaded weights plus one chunk.
Writing checkpoints uses the `safetensors` library.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tulu.errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

CHUNK_BYTES = 16 * 1024 * 1024
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate the header; every error names the file (and tensor)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: truncated safetensors file ({size} bytes, no header)"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header claims {header_len} "
                    f"bytes, file has {size})"
                )
            raw = f.read(header_len)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, data_start, size)
    # Two tensors sharing bytes would silently load one's data as the other's.
    ordered = sorted((e for e in entries.values() if e.end > e.begin), key=lambda e: e.begin)
    for before, after in itertools.pairwise(ordered):
        if after.begin < before.end:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensors {before.name!r} and "
                f"{after.name!r} overlap (bytes {before.begin}-{before.end} and "
                f"{after.begin}-{after.end})"
            )
    return entries


def _entry(path: Path, name: str, info: object, data_start: int, size: int) -> TensorEntry:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r}: {why}")

    if not isinstance(info, dict):
        raise bad("header entry is not an object")
    dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise bad(f"unsupported dtype {info.get('dtype')!r}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad(f"invalid shape {shape!r}")
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise bad(f"invalid data_offsets {offsets!r}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if offsets[1] - offsets[0] != expected:
        raise bad(f"{offsets[1] - offsets[0]} bytes stored but shape {shape} needs {expected}")
    begin, end = data_start + offsets[0], data_start + offsets[1]
    if end > size:
        raise bad(f"file is truncated: the tensor ends at byte {end} but the file has {size} bytes")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def read_tensor(
    path: Path,
    entry: TensorEntry,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    file=None,
) -> torch.Tensor:
    """Read one tensor into a new tensor of `dtype` on `device`, CHUNK_BYTES at a time."""
    target_dtype = dtype or entry.dtype
    out = torch.empty(entry.shape, dtype=target_dtype, device=device)
    if entry.numel == 0:
        return out
    flat = out.view(-1)
    direct = torch.device(device).type == "cpu" and target_dtype == entry.dtype
    itemsize = entry.dtype.itemsize
    per_chunk = max(1, CHUNK_BYTES // itemsize)
    own = file is None
    f = open(path, "rb") if own else file
    try:
        f.seek(entry.begin)
        for start in range(0, entry.numel, per_chunk):
            count = min(per_chunk, entry.numel - start)
            if direct:
                dest = memoryview(flat[start : start + count].view(torch.uint8).numpy())
                got = f.readinto(dest)
                if got != count * itemsize:
                    raise CheckpointError(f"{path}: tensor {entry.name!r}: unexpected end of file")
            else:
                buf = bytearray(count * itemsize)
                if f.readinto(buf) != len(buf):
                    raise CheckpointError(f"{path}: tensor {entry.name!r}: unexpected end of file")
                chunk = torch.frombuffer(buf, dtype=entry.dtype)
                flat[start : start + count].copy_(chunk)
    finally:
        if own:
            f.close()
    return out


def read_tensors(
    path: Path,
    entries: list[TensorEntry],
    dtype_for: Callable[[TensorEntry], torch.dtype],
    device: torch.device | str = "cpu",
) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
    """Yield (entry, tensor) for `entries` in file order; `dtype_for(entry)` picks each dtype."""
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for entry in sorted(entries, key=lambda e: e.begin):
            yield entry, read_tensor(path, entry, dtype_for(entry), device, file=f)
