"""An adapter's two files, read as untrusted input.

A runtime load reads files a client named, so nothing in them is believed
before it is checked against what is on disk: the config's size is capped
before it is read, and the safetensors header's length and every tensor's
offsets are checked against the file's size before a byte of tensor data is
read, so a header that claims terabytes allocates nothing. The files are
opened once each (by their resolved path, which must lie inside the allowed
directories when there are any: a symlink inside --lora-dir may not lead out
of it), and the content hash is taken over the very bytes the tensors are
made from. If a file is replaced or rewritten while it is read, the load is
refused as inconsistent rather than served under a hash of other bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import torch

from loraserve.errors import InvalidRequest

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

MAX_CONFIG_BYTES = 1 << 20
"""PEFT writes a config of a few hundred bytes; a `rank_pattern` over every
module of a large model stays well under this."""

MAX_HEADER_BYTES = 100_000_000
"""The safetensors format's own limit on its JSON header."""

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
"""safetensors dtypes → torch's (the ones torch can hold)."""

HASHED_CONFIG = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
                 "target_parameters")
"""The config fields that change what the weights compute: part of the adapter's identity."""


class AdapterError(InvalidRequest):
    """An adapter we refuse to serve; the message says why (`field`: the request
    field at fault, the adapter's path unless said otherwise)."""

    def __init__(self, message: str, field: str = "lora_path") -> None:
        super().__init__(field, message)


@dataclass
class AdapterFiles:
    config: dict
    tensors: dict[str, torch.Tensor]
    """As stored (views of the bytes read, not copies)."""
    id: str
    """Content hash of the config's identity fields and the weights file's bytes."""


def content_id(config: dict, weights: bytes | bytearray) -> str:
    keep = {k: config.get(k) for k in HASHED_CONFIG}
    h = hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode())
    h.update(weights)
    return h.hexdigest()[:32]


def read_adapter_files(path: Path, within: Sequence[Path] = ()) -> AdapterFiles:
    """Read and check an adapter directory's config and weights (AdapterError
    says what is wrong). `within`: resolved directories every file must lie in
    (none: any, the operator's own --lora paths)."""
    if not path.is_dir():
        raise AdapterError(f"adapter {path}: no such directory")
    opened = [_open(path, name, within) for name in (CONFIG, WEIGHTS)]
    try:
        (config_file, config_stat), (weights_file, weights_stat) = opened
        config = _read_config(path, config_file, config_stat.st_size)
        weights, tensors = _read_weights(path, weights_file, weights_stat.st_size)
        for (f, before), name in zip(opened, (CONFIG, WEIGHTS)):
            _check_unchanged(path, name, f, before)
    finally:
        for f, _ in opened:
            f.close()
    return AdapterFiles(config, tensors, content_id(config, weights))


def _open(path: Path, name: str, within: Sequence[Path]) -> tuple[BinaryIO, os.stat_result]:
    file = path / name
    if not file.is_file():
        raise AdapterError(f"adapter {path}: missing {name}")
    real = file.resolve()
    if within and not any(real.is_relative_to(d) for d in within):
        raise AdapterError(f"adapter {path}: {name} is a link to {real}, outside the allowed --lora-dir directories")
    try:
        f = open(real, "rb")
    except OSError as e:
        raise AdapterError(f"adapter {path}: cannot open {name} ({e})") from e
    return f, os.fstat(f.fileno())


def _read_config(path: Path, f: BinaryIO, size: int) -> dict:
    if size > MAX_CONFIG_BYTES:
        raise AdapterError(f"adapter {path}: {CONFIG} is {size} bytes, more than the {MAX_CONFIG_BYTES} "
                           f"an adapter config may have")
    data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:  # it grew since it was opened
        raise AdapterError(f"adapter {path}: {CONFIG} changed while it was read; load it again once it is written")
    return _json_object(f"adapter {path}: {CONFIG}", data)


def _json_object(what: str, data: bytes) -> dict:
    """`data` parsed, which must be a JSON object; `what` names it in the error."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise AdapterError(f"{what} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise AdapterError(f"{what} is not a JSON object")
    return value


def _read_weights(path: Path, f: BinaryIO, size: int) -> tuple[bytearray, dict[str, torch.Tensor]]:
    """The file's bytes and its tensors (views of them). The header is read and
    checked against `size` first; only then is the data read."""
    where = f"adapter {path}: {WEIGHTS}"
    if size < 8:
        raise AdapterError(f"{where} is {size} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > size - 8:
        raise AdapterError(f"{where}: the header length {header_len} is beyond the file's {size} bytes")
    if header_len > MAX_HEADER_BYTES:
        raise AdapterError(f"{where}: the header length {header_len} is over safetensors' {MAX_HEADER_BYTES}")
    header_bytes = f.read(header_len)
    entries = _parse_header(where, header_bytes, size - 8 - header_len)
    data = bytearray(size)
    f.seek(0)
    if f.readinto(data) != size or data[8:8 + header_len] != header_bytes or f.read(1):
        raise AdapterError(f"{where} changed while it was read; load it again once it is written")
    base = 8 + header_len
    tensors = {}
    for name, (dtype, shape, start, end) in entries.items():
        numel = math.prod(shape)
        tensors[name] = (torch.frombuffer(data, dtype=dtype, count=numel, offset=base + start).reshape(shape)
                         if numel else torch.empty(shape, dtype=dtype))
    return data, tensors


def _parse_header(where: str, header_bytes: bytes, data_len: int) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """name → (dtype, shape, start, end) of each tensor, every one checked to lie
    inside the file's `data_len` bytes of data and to fill its byte range exactly."""
    header = _json_object(f"{where}: the header", header_bytes)
    entries, end_of_data = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            if not all(isinstance(x, int) and x >= 0 for x in (*shape, start, end)) or end < start:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise AdapterError(f"{where}: tensor {name!r} has no valid dtype, shape and data_offsets "
                               f"(dtypes: {sorted(DTYPES)})") from None
        claimed = math.prod(shape) * dtype.itemsize
        if end > data_len:
            raise AdapterError(f"{where}: tensor {name!r} claims bytes {start}..{end}, but the file holds only "
                               f"{data_len} bytes of data")
        if end - start != claimed:
            raise AdapterError(f"{where}: tensor {name!r} of shape {shape} needs {claimed} bytes, but its "
                               f"data_offsets span {end - start}")
        entries[name] = (dtype, shape, start, end)
        end_of_data = max(end_of_data, end)
    if end_of_data != data_len:
        raise AdapterError(f"{where}: the tensors cover {end_of_data} bytes of data, but the file holds {data_len}")
    return entries


def _check_unchanged(path: Path, name: str, f: BinaryIO, before: os.stat_result) -> None:
    """Refuse a file that was rewritten (same inode) or replaced (its path now
    names another file) while it was read: what was read may mix versions, or
    not be what the directory now holds."""
    try:
        now, at_path = os.fstat(f.fileno()), (path / name).resolve().stat()
    except OSError as e:
        raise AdapterError(f"adapter {path}: {name} changed while it was read ({e})") from None
    key = lambda s: (s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns)  # noqa: E731
    if not key(before) == key(now) == key(at_path):
        raise AdapterError(f"adapter {path}: {name} changed while it was read; load it again once it is written")
