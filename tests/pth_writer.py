"""A torch-free writer of PyTorch checkpoints in the layout the authors release:
``{"state_dict": OrderedDict(name -> tensor)}``, in either torch.save format.

It lets the tests make full-size checkpoints where PyTorch is not installed (the core
install). It writes the pickle opcode by opcode, as torch.save's protocol-2 pickler does,
so it needs neither torch's globals nor pickle's internals; `tests/test_pth.py` checks that
`torch.load` reads its files (where torch is installed) and that they read back like the
files torch wrote in `tests/data/pth`.
"""

from __future__ import annotations

import pathlib
import pickle
import struct
import zipfile
from typing import Mapping

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
