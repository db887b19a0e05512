"""A torch-free writer of PyTorch checkpoints in the layout the authors release:
``{"state_dict": OrderedDict(name -> tensor)}``, in either torch.save format.

It lets the tests make full-size checkpoints where PyTorch is not installed (the core
install). It writes the pickle opcode by opcode, as torch.save's protocol-2 pickler does,
so it needs neither torch's globals nor pickle's internals; `tests/test_pth.py` checks that
`torch.load` reads its files (where torch is installed) and that they read back like the
files torch wrote in `tests/data/pth`.

The lower-level pieces (`tensor`, `write_pickle`, `write_overlapping_zip`) also write the
hostile files of `tests/test_pth_limits.py`: views and sizes a file declares but does not
hold, nesting torch's pickler would recurse on, zips whose records share bytes.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import struct
import zipfile
import zlib
from typing import Mapping, Sequence

import numpy as np

_STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
             np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage"}
# torch/serialization.py's MAGIC_NUMBER and PROTOCOL_VERSION.
_MAGIC, _PROTOCOL = 0x1950A86A20F9469CFC6C, 1001


def _text(value: str) -> bytes:
  encoded = value.encode("utf-8")
  return pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded


def _int(value: int) -> bytes:
  return pickle.BININT + struct.pack("<i", value)


def _tuple(items) -> bytes:
  return pickle.MARK + b"".join(items) + pickle.TUPLE


def _global(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")


def _ordered_dict(items: list[tuple[bytes, bytes]]) -> bytes:
  return (_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE +
          pickle.MARK + b"".join(key + value for key, value in items) + pickle.SETITEMS)


def _tensor(key: str, array: np.ndarray, legacy: bool) -> bytes:
  """torch._utils._rebuild_tensor_v2(storage, 0, size, contiguous stride, False, {})."""
  storage = [_text("storage"), _global("torch", _STORAGES[array.dtype]), _text(key),
             _text("cpu"), _int(array.size)] + ([pickle.NONE] if legacy else [])
  strides = [int(np.prod(array.shape[i + 1:])) for i in range(array.ndim)]
  arguments = [_tuple(storage) + pickle.BINPERSID, _int(0),
               _tuple(_int(n) for n in array.shape), _tuple(_int(s) for s in strides),
               pickle.NEWFALSE, _ordered_dict([])]
  return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(arguments) + pickle.REDUCE


def write_pth(path: str | pathlib.Path, state_dict: Mapping[str, np.ndarray], *,
              legacy: bool = False) -> pathlib.Path:
  """Writes ``{"state_dict": state_dict}`` as torch.save would: the zip format, or with
  `legacy` the format of PyTorch <= 1.5. Arrays: float32, float64, float16 or int64, stored
  contiguous, one storage each (keys "0", "1", ...)."""
  arrays = {name: np.ascontiguousarray(value) for name, value in state_dict.items()}
  keys = {name: str(index) for index, name in enumerate(arrays)}
  body = _ordered_dict([(_text(name), _tensor(keys[name], array, legacy))
                        for name, array in arrays.items()])
  data = (pickle.PROTO + bytes([2]) + pickle.EMPTY_DICT + _text("state_dict") + body +
          pickle.SETITEM + pickle.STOP)
  path = pathlib.Path(path)
  if legacy:
    with path.open("wb") as file:
      for header in (_MAGIC, _PROTOCOL, {"protocol_version": _PROTOCOL, "little_endian": True,
                                         "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, file, protocol=2)
      file.write(data)
      ordered = sorted(arrays, key=lambda name: keys[name])
      pickle.dump([keys[name] for name in ordered], file, protocol=2)
      for name in ordered:
        file.write(struct.pack("<q", arrays[name].size))
        file.write(arrays[name].astype(arrays[name].dtype.newbyteorder("<")).tobytes())
    return path
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr("archive/data.pkl", data)
    archive.writestr("archive/byteorder", "little")
    for name, array in arrays.items():
      archive.writestr(f"archive/data/{keys[name]}",
                       array.astype(array.dtype.newbyteorder("<")).tobytes())
    archive.writestr("archive/version", "3\n")
  return path


# ------------------------------------------------------- hand-made (hostile) files


def tensor(key: str, storage: str, count: int, size: Sequence[int], stride: Sequence[int], *,
           offset: int = 0, legacy: bool = False, negated: bool = False) -> bytes:
  """The pickle of a tensor over storage `key` (torch.<storage>, `count` elements as the
  persistent id declares them, whatever the file holds): _rebuild_tensor_v2(storage,
  offset, size, stride, False, {}, metadata), metadata {"neg": True} if `negated`."""
  persistent = [_text("storage"), _global("torch", storage), _text(key), _text("cpu"),
                _long(count)] + ([pickle.NONE] if legacy else [])
  metadata = (pickle.EMPTY_DICT + _text("neg") + pickle.NEWTRUE + pickle.SETITEM
              if negated else pickle.EMPTY_DICT)
  arguments = [_tuple(persistent) + pickle.BINPERSID, _long(offset),
               _tuple(map(_long, size)), _tuple(map(_long, stride)), pickle.NEWFALSE,
               _ordered_dict([]), metadata]
  return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(arguments) + pickle.REDUCE


def _long(value: int) -> bytes:
  """Any integer (LONG1), as pickle writes one beyond 32 bits."""
  encoded = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "little", signed=True)
  if len(encoded) < 256:
    return pickle.LONG1 + bytes([len(encoded)]) + encoded
  return pickle.LONG4 + struct.pack("<i", len(encoded)) + encoded


def dictionary(items: Sequence[tuple[bytes, bytes]]) -> bytes:
  """A plain dict of pickled keys and values."""
  return pickle.EMPTY_DICT + pickle.MARK + b"".join(k + v for k, v in items) + pickle.SETITEMS


def text(value: str) -> bytes:
  return _text(value)


def write_pickle(path: str | pathlib.Path, body: bytes,
                 storages: Mapping[str, np.ndarray] | None = None, *, legacy: bool = False,
                 counts: Mapping[str, int] | None = None,
                 compression: int = zipfile.ZIP_STORED) -> pathlib.Path:
  """A checkpoint whose object pickle is `body` (opcodes, without PROTO and STOP) and
  whose storages hold `storages` (arrays by key, stored little-endian): a zip (its records
  compressed with `compression`) or, with `legacy`, the old format, each storage's element
  count written as `counts` says (its array's size by default)."""
  counts = {key: array.size for key, array in (storages or {}).items()} | dict(counts or {})
  storages = {key: np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
              for key, array in (storages or {}).items()}
  data = pickle.PROTO + bytes([2]) + body + pickle.STOP
  path = pathlib.Path(path)
  if legacy:
    with path.open("wb") as file:
      for header in (_MAGIC, _PROTOCOL, {"little_endian": True}):
        pickle.dump(header, file, protocol=2)
      file.write(data)
      pickle.dump(list(storages), file, protocol=2)
      for key, raw in storages.items():
        file.write(struct.pack("<q", counts[key]) + raw)
    return path
  with zipfile.ZipFile(path, "w", compression) as archive:
    archive.writestr("archive/data.pkl", data)
    archive.writestr("archive/byteorder", "little")
    for key, raw in storages.items():
      archive.writestr(f"archive/data/{key}", raw)
  return path


def set_declared_size(path: str | pathlib.Path, name: str, size: int) -> None:
  """Makes the zip at `path` declare `size` uncompressed bytes for record `name` in its
  central directory (where readers take sizes from), its data unchanged."""
  raw = bytearray(pathlib.Path(path).read_bytes())
  with zipfile.ZipFile(io.BytesIO(bytes(raw))) as archive:
    entry = archive.start_dir
    for info in archive.infolist():
      if info.filename == name:
        raw[entry + 24:entry + 28] = struct.pack("<I", size)
      entry += 46 + len(info.filename.encode()) + len(info.extra) + len(info.comment)
  pathlib.Path(path).write_bytes(bytes(raw))


def write_overlapping_zip(path: str | pathlib.Path, body: bytes, keys: Sequence[str],
                          payload: bytes) -> list[int]:
  """A zip bomb of records that share bytes (stored, so no compression is involved): record
  ``archive/data/<keys[i]>`` holds the local headers of the records after it and then
  `payload`, so the records together declare about len(keys) times the payload while the
  file holds it once. The object pickle is `body`; returns each record's byte count."""
  pickled = pickle.PROTO + bytes([2]) + body + pickle.STOP
  names = [f"archive/data/{key}".encode() for key in keys]
  sizes, crcs, headers = [0] * len(keys), [0] * len(keys), [b""] * len(keys)
  after = payload
  for i in reversed(range(len(keys))):  # each header wraps what follows it
    sizes[i], crcs[i] = len(after), zlib.crc32(after)
    headers[i] = _local_header(names[i], crcs[i], sizes[i])
    after = headers[i] + after
  pickle_name = b"archive/data.pkl"
  entries = [(pickle_name, zlib.crc32(pickled), len(pickled), 0)]
  offset = len(_local_header(pickle_name, 0, 0)) + len(pickled)
  for name, crc, size, header in zip(names, crcs, sizes, headers):
    entries.append((name, crc, size, offset))
    offset += len(header)
  blob = _local_header(pickle_name, entries[0][1], len(pickled)) + pickled + after
  directory = b"".join(
      struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, 0, 0, 0, crc, size,
                  size, len(name), 0, 0, 0, 0, 0, at) + name
      for name, crc, size, at in entries)
  end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries),
                    len(directory), len(blob), 0)
  pathlib.Path(path).write_bytes(blob + directory + end)
  return sizes


def _local_header(name: bytes, crc: int, size: int) -> bytes:
  return struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, crc, size, size,
                     len(name), 0) + name
