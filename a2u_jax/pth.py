"""PyTorch checkpoint files (.pth, .pth.tar, .pt) read without PyTorch.

    checkpoint = pth.read_pth("model_best.pth")   # {"state_dict": OrderedDict(...), ...}

A checkpoint is a pickle whose tensors point at raw storages (torch/serialization.py), in
one of two containers:

  zip (PyTorch >= 1.6)  an uncompressed zip of one folder holding ``data.pkl`` (the pickle),
      ``data/<key>`` (each storage's raw bytes) and ``byteorder`` ("little" or "big";
      little when absent, as PyTorch reads it).
  legacy (PyTorch <= 1.5, e.g. the authors' 1.3.1; ``_use_new_zipfile_serialization=False``)
      consecutive pickles: the magic number, the protocol version 1001, a sys-info dict, the
      object, then the list of storage keys; after them, per key, an 8-byte little-endian
      element count and the storage's bytes, little-endian.

In both, the object pickle names a storage by the persistent id ("storage", storage type,
key, location, element count), the legacy one with a sixth entry, a view (view key,
element offset, element count) or None; tensors are rebuilt by
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` with offsets and
strides in elements, several tensors possibly viewing one storage.

Unpickling can run any code a file asks for, so the unpickler here resolves only the
globals that a checkpoint of weights and training counters needs (`ALLOWED_GLOBALS`), each
to a function of this module, and refuses any other global by name. Tensors come back as
C-contiguous NumPy arrays (copies, bit for bit, in the storage's dtype: float64, float32,
float16, bfloat16, int64, int32, int16, int8, uint8, bool), state dicts as
`collections.OrderedDict` (with their `_metadata` attribute), NumPy scalars as NumPy
scalars, and everything else as the plain Python values pickle builds (dicts, lists,
tuples, numbers, strings, bytes, None).
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable

import jax.numpy as jnp
import numpy as np

# torch/serialization.py's MAGIC_NUMBER and PROTOCOL_VERSION (the legacy format's first two
# pickles).
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# Storage classes, as the persistent ids name them, and their element types (all stored
# little-endian unless a zip's byteorder record says big).
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64), "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(jnp.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
}


class _Refused(ValueError):
  """The file asks for something this reader does not build (said as is, after the path)."""


class _Placeholder:
  """Objects this module hands to the unpickler. Pickle's BUILD opcode would set their
  state (or, on a function, its attributes), so they refuse it."""

  __slots__ = ()

  def __setstate__(self, state):
    raise _Refused(f"refuses to set the state of a {type(self).__name__.strip('_')}")


class _Storage(_Placeholder):
  """A storage (or a legacy view of one): `count` elements of `dtype` from element `offset`
  of the root storage `key`'s data, which is read after the object pickle."""

  __slots__ = ("dtype", "key", "offset", "count")

  def __init__(self, dtype: np.dtype, key: str, offset: int, count: int):
    self.dtype, self.key, self.offset, self.count = dtype, key, offset, count


class _Tensor(_Placeholder):
  """A tensor to cut from its storage once the storages' data is read; `negated`: PyTorch's
  negative bit (a lazily negated view, saved as the un-negated data and a flag)."""

  __slots__ = ("storage", "offset", "size", "stride", "negated")

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
    self.negated = False


class _NumpyDType(_Placeholder):
  """A `numpy.dtype` being unpickled: its name, then (BUILD) its byte order."""

  __slots__ = ("dtype",)

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype

  def __setstate__(self, state):
    # numpy.dtype.__reduce__'s state for a plain number type: (3, byte order, None, None,
    # None, -1, -1, 0); anything else (fields, subarrays, objects) is not a number.
    if (not isinstance(state, tuple) or len(state) != 8 or state[1] not in "<>|="
        or any(field is not None for field in state[2:5])):
      raise _Refused(f"refuses a numpy.dtype state other than a number's: {state!r:.80}")
    self.dtype = self.dtype.newbyteorder(state[1])


class _Global(_Placeholder):
  """An allowed global: calling it builds the value with `function`."""

  __slots__ = ("name", "function")

  def __init__(self, name: str, function: Callable):
    self.name, self.function = name, function

  def __call__(self, *args):
    return self.function(*args)


def _int_tuple(name: str, value) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise _Refused(f"a tensor's {name} is {value!r:.80}, not a tuple of integers")
  return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride) -> _Tensor:
  """torch._utils._rebuild_tensor: `size` elements of `storage`, `stride` apart (elements)."""
  if not isinstance(storage, _Storage):
    raise _Refused(f"a tensor's storage is a {type(storage).__name__}, not a storage")
  if not isinstance(storage_offset, int) or storage_offset < 0:
    raise _Refused(f"a tensor's storage offset is {storage_offset!r:.40}")
  return _Tensor(storage, storage_offset, _int_tuple("size", size), _int_tuple("stride", stride))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> _Tensor:
  """torch._utils._rebuild_tensor_v2. requires_grad carries no value; backward hooks are
  not saved (an empty OrderedDict); metadata holds the negative and conjugate bits."""
  tensor = _rebuild_tensor(storage, storage_offset, size, stride)
  flags = dict(metadata or {})
  tensor.negated = bool(flags.pop("neg", False))
  if any(flags.values()):
    raise _Refused(f"a tensor's metadata is {metadata!r:.80}; only the negative bit is read")
  return tensor


def _rebuild_parameter(data, requires_grad, backward_hooks):
  """torch._utils._rebuild_parameter: an nn.Parameter is its tensor."""
  if not isinstance(data, _Tensor):
    raise _Refused(f"a parameter's data is a {type(data).__name__}, not a tensor")
  return data


def _numpy_dtype(name, align=False, copy=True) -> _NumpyDType:
  dtype = np.dtype(name) if isinstance(name, str) else None
  if dtype is None or dtype.kind not in "biufc":
    raise _Refused(f"refuses numpy.dtype({name!r:.40}): only number types are read")
  return _NumpyDType(dtype)


def _numpy_scalar(dtype, data) -> np.generic:
  if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
    raise _Refused("a numpy scalar is not a number type and its bytes")
  if len(data) != dtype.dtype.itemsize:
    raise _Refused(f"a numpy {dtype.dtype} scalar has {len(data)} bytes")
  return np.frombuffer(data, dtype.dtype)[0].astype(dtype.dtype.newbyteorder("="))


def _encode(text, encoding) -> bytes:
  """_codecs.encode, which protocol-2 pickles use for bytes (as latin-1 text)."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise _Refused(f"refuses _codecs.encode(..., {encoding!r:.20})")
  return text.encode("latin1")


# (module, name) -> what the unpickler calls. Storage classes are handled as types of
# their own (`STORAGE_DTYPES`). NumPy moved `multiarray` to `numpy._core` in 2.0.
ALLOWED_GLOBALS: dict[tuple[str, str], Callable] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("_codecs", "encode"): _encode,
}


class _StorageType(_Placeholder):
  """torch.<X>Storage as a persistent id names it."""

  __slots__ = ("name", "dtype")

  def __init__(self, name: str):
    self.name, self.dtype = name, STORAGE_DTYPES[name]

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _Unpickler(pickle.Unpickler):
  """Resolves `ALLOWED_GLOBALS` and the storage types, refuses every other global, and
  records the storages that persistent ids name (`storages`: root key -> (dtype, count))."""

  def __init__(self, file: BinaryIO, legacy: bool):
    super().__init__(file, encoding="utf-8")
    self.legacy = legacy
    self.storages: dict[str, tuple[np.dtype, int]] = {}

  def find_class(self, module: str, name: str):
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in ALLOWED_GLOBALS:
      return _Global(f"{module}.{name}", ALLOWED_GLOBALS[(module, name)])
    # Tensors of other dtypes (uint16, float8, complex, quantised), sparse or subclassed.
    if (module == "torch" and name.endswith("Storage")) or (
        module == "torch._utils" and name.startswith("_rebuild_")):
      raise _Refused(f"has a tensor of a kind not read ({module}.{name}); dense tensors of "
                     f"{', '.join(map(str, STORAGE_DTYPES.values()))} are")
    raise _Refused(
        f"refuses to load {module}.{name}: a .pth can run code as it loads, so only what a "
        f"state dict holds is built (tensors, dicts, lists, numbers, strings); if the file "
        f"is a whole pickled model, re-save its state_dict() with torch.save")

  def persistent_load(self, pid) -> _Storage:
    expected = 6 if self.legacy else 5
    if not (isinstance(pid, tuple) and len(pid) == expected and pid[0] == "storage"):
      raise _Refused(f"refuses the persistent id {pid!r:.80} (expected a {expected}-tuple "
                     f"('storage', type, key, location, count{', view' if self.legacy else ''}))")
    storage_type, key, _, count = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise _Refused(f"storage {key!r:.40}: type {storage_type!r:.40} is not one of "
                     f"torch.{', torch.'.join(STORAGE_DTYPES)}")
    if not isinstance(key, str) or not isinstance(count, int) or count < 0:
      raise _Refused(f"refuses the storage id {pid!r:.80}")
    known = self.storages.setdefault(key, (storage_type.dtype, count))
    if known != (storage_type.dtype, count):
      raise _Refused(f"storage {key!r} is named as {known} and as {(storage_type.dtype, count)}")
    view = pid[5] if self.legacy else None
    if view is None:
      return _Storage(storage_type.dtype, key, 0, count)
    # A view of PyTorch < 1.0: (view key, element offset, element count) of the root.
    _, offset, view_count = view
    if not (isinstance(offset, int) and isinstance(view_count, int) and offset >= 0
            and view_count >= 0 and offset + view_count <= count):
      raise _Refused(f"storage {key!r}: view {view!r:.80} lies outside its {count} elements")
    return _Storage(storage_type.dtype, key, offset, view_count)


def _array(tensor: _Tensor, data: dict[str, np.ndarray]) -> np.ndarray:
  """The tensor's elements as a new C-contiguous array, after checking that every element
  its size and strides reach lies inside its storage."""
  storage = tensor.storage
  if len(tensor.size) != len(tensor.stride) or min(tensor.size + tensor.stride, default=0) < 0:
    raise _Refused(f"a tensor has size {tensor.size} and stride {tensor.stride}")
  if 0 in tensor.size:
    return np.zeros(tensor.size, storage.dtype)
  last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
  if last >= storage.count:
    raise _Refused(f"a tensor of size {tensor.size}, stride {tensor.stride} and offset "
                   f"{tensor.offset} reads past its storage's {storage.count} elements")
  flat = data[storage.key][storage.offset + tensor.offset:]
  view = np.lib.stride_tricks.as_strided(
      flat, shape=tensor.size, strides=[s * flat.itemsize for s in tensor.stride],
      writeable=False)
  return np.negative(view, order="C") if tensor.negated else np.array(view, order="C")


def _resolve(value, data: dict[str, np.ndarray], seen: dict[int, Any]):
  """`value` with every tensor replaced by its array, containers changed in place (so
  shared and self-referencing containers stay so, and OrderedDicts keep `_metadata`)."""
  if isinstance(value, _Tensor):
    return _array(value, data)
  if isinstance(value, _Placeholder):
    raise _Refused(f"a {type(value).__name__.strip('_')} stands where a value should")
  if id(value) in seen:
    return seen[id(value)]
  if isinstance(value, (dict, set, frozenset)) and any(
      isinstance(key, _Placeholder) for key in value):
    raise _Refused("a tensor or storage is a dict key or a set member")
  if isinstance(value, dict):
    seen[id(value)] = value
    for key in value:
      value[key] = _resolve(value[key], data, seen)
  elif isinstance(value, list):
    seen[id(value)] = value
    value[:] = [_resolve(item, data, seen) for item in value]
  elif isinstance(value, tuple):
    resolved = tuple(_resolve(item, data, seen) for item in value)
    seen[id(value)] = resolved
    return resolved
  return value


def _storage_array(raw: bytes, dtype: np.dtype, count: int, key: str) -> np.ndarray:
  if len(raw) != count * dtype.itemsize:
    raise _Refused(f"storage {key!r} holds {len(raw)} bytes, expected {count} x "
                   f"{dtype.itemsize} ({dtype}); is the file truncated?")
  return np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="), copy=False)


def _read_zip(archive: zipfile.ZipFile):
  pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
  if len(pickles) != 1:
    names = archive.namelist()
    if any(n.endswith("/constants.pkl") for n in names):
      raise _Refused("is a TorchScript archive (torch.jit.save), not a checkpoint; save the "
                     "model's state_dict() with torch.save")
    raise _Refused(f"is a zip archive without one top-level <folder>/data.pkl (first "
                   f"entries: {names[:3]}); not a PyTorch checkpoint")
  folder = pickles[0][:-len("data.pkl")]
  names = set(archive.namelist())
  order = "little"
  if f"{folder}byteorder" in names:
    order = archive.read(f"{folder}byteorder").decode("ascii", "replace")
    if order not in ("little", "big"):
      raise _Refused(f"byteorder record is {order!r}, expected 'little' or 'big'")
  unpickler = _Unpickler(io.BytesIO(archive.read(pickles[0])), legacy=False)
  result = unpickler.load()
  data = {}
  for key, (dtype, count) in unpickler.storages.items():
    name = f"{folder}data/{key}"
    if name not in names:
      raise _Refused(f"has no record {name} for storage {key!r}")
    dtype = dtype.newbyteorder("<" if order == "little" else ">")
    data[key] = _storage_array(archive.read(name), dtype, count, key)
  return result, data


def _read_legacy(file: BinaryIO):
  def header():
    return _Unpickler(file, legacy=True).load()

  if header() != LEGACY_MAGIC:
    raise _Refused("does not start with PyTorch's magic number; not a PyTorch checkpoint")
  protocol = header()
  if protocol != LEGACY_PROTOCOL:
    raise _Refused(f"has legacy protocol version {protocol!r}, expected {LEGACY_PROTOCOL}")
  header()  # sys info: the writer's byte order and C type sizes, which the data does not use
  unpickler = _Unpickler(file, legacy=True)
  result = unpickler.load()
  keys = header()
  if (not isinstance(keys, list) or not all(isinstance(key, str) for key in keys)
      or sorted(keys) != sorted(unpickler.storages)):
    raise _Refused(f"lists the storages {keys!r:.80} but its object names "
                   f"{sorted(unpickler.storages)!r:.80}")
  data = {}
  for key in keys:
    dtype, count = unpickler.storages[key]
    (stored,) = struct.unpack("<q", file.read(8).ljust(8, b"\0"))
    if stored != count:
      raise _Refused(f"storage {key!r} holds {stored} elements, its tensors name {count}; "
                     f"is the file truncated?")
    data[key] = _storage_array(file.read(count * dtype.itemsize), dtype.newbyteorder("<"),
                               count, key)
  return result, data


def read_pth(path: str | os.PathLike) -> Any:
  """The object a PyTorch checkpoint file holds, built without PyTorch.

  Reads both of torch.save's formats (see the module docstring). Tensors are NumPy arrays
  (C-contiguous copies, their own dtype); dicts, OrderedDicts, lists, tuples, numbers,
  strings and NumPy scalars are as saved. Raises FileNotFoundError for a missing file and
  ValueError, naming the file, for anything else: another format, a truncated file, or a
  global outside `ALLOWED_GLOBALS` (named in the message; nothing it asks for is run).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: checkpoint file not found")
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as archive:
        result, data = _read_zip(archive)
    else:
      with path.open("rb") as file:
        if file.read(262)[257:262] == b"ustar":
          raise _Refused("is in PyTorch's tar format (before 1.0), which is not read; load "
                         "it with torch and save it again")
        file.seek(0)
        result, data = _read_legacy(file)
    return _resolve(result, data, {})
  except _Refused as error:
    raise ValueError(f"{path}: {error}") from None
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
          KeyError, IndexError, AttributeError) as error:
    # What a damaged or foreign file makes pickle or zipfile raise.
    raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: "
                     f"{error})") from None
