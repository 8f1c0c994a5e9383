"""Lazy reader of a safetensors checkpoint: one file, or shards listed by model.safetensors.index.json.

Headers are parsed directly (8-byte little-endian length + JSON) so names, dtypes and shapes are known before any
tensor is read; tensors are then read one at a time through safe_open (memory-mapped, so only the tensor being
loaded occupies host memory). Names are ordered by file, then by offset within the file, for sequential disk reads.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype tag -> torch dtype (tags torch cannot hold are reported by name, not mapped).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class WeightError(ValueError):
    """A checkpoint qnext cannot load; the message names the tensor or file at fault."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str                 # safetensors tag, e.g. "BF16", "F8_E4M3"
    shape: tuple[int, ...]
    offset: int                # start of the data within the file's data section
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor entries of one .safetensors file (no tensor data read)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise WeightError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightError(f"cannot read the safetensors header of {path}: {e}") from e
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out[name] = TensorInfo(name, path, meta["dtype"], tuple(meta["shape"]), start, end - start)
    return out


class SafetensorsCheckpoint:
    """`names`, `info(name)`, `get(name)` (CPU tensor), iteration yields (name, tensor) lazily."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self._index: dict[str, str] | None = None  # name -> shard file, when an index exists
        if path.is_file():
            files = [path]
        elif (path / INDEX_FILE).is_file():
            files = self._files_from_index(path)
        elif (path / SINGLE_FILE).is_file():
            files = [path / SINGLE_FILE]
        else:
            files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
            if not files:
                raise WeightError(f"no safetensors weights at {path} (expected {SINGLE_FILE} or {INDEX_FILE})")
        self.path = path
        self._info: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in sorted(read_header(f).items(), key=lambda kv: kv[1].offset):
                if name in self._info:
                    raise WeightError(f"tensor {name} is stored twice: in {self._info[name].file.name} "
                                          f"and {f.name}")
                self._info[name] = info
        if self._index is not None:
            for name, fname in self._index.items():
                if name not in self._info or self._info[name].file.name != fname:
                    raise WeightError(f"{INDEX_FILE} puts {name} in {fname}, but that file does not hold it")
        self._handles: dict[Path, object] = {}

    def _files_from_index(self, path: Path) -> list[Path]:
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightError(f"{path / INDEX_FILE} is not a valid index (needs a weight_map): {e}") from e
        self._index = dict(weight_map)
        files = []
        for fname in sorted(set(weight_map.values())):
            if not (path / fname).is_file():
                raise WeightError(f"shard {fname} listed in {INDEX_FILE} is missing from {path}")
            files.append(path / fname)
        return files

    @property
    def names(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def get(self, name: str) -> torch.Tensor:
        """The tensor on the CPU (a dtype torch lacks raises WeightError naming the tensor)."""
        info = self._info[name]
        if info.dtype not in DTYPES:
            raise WeightError(f"tensor {name} in {info.file.name} has dtype {info.dtype}, which torch cannot "
                                  f"hold (readable: {', '.join(DTYPES)})")
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
        return handle.get_tensor(name)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._info:
            yield name, self.get(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
