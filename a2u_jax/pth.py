"""PyTorch checkpoint files (.pth, .pth.tar, .pt) read without PyTorch.

    checkpoint = pth.read_pth("model_best.pth")   # {"state_dict": OrderedDict(...), ...}

A checkpoint is a pickle whose tensors point at raw storages (torch/serialization.py), in
one of two containers:

  zip (PyTorch >= 1.6)  a zip of one folder holding ``data.pkl`` (the pickle),
      ``data/<key>`` (each storage's raw bytes) and ``byteorder`` ("little" or "big";
      little when absent, as PyTorch reads it). torch.save stores its records
      uncompressed; deflated ones (a zip re-packed by hand) are read too, as torch does.
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
to a function of this module, and refuses any other global by name. A tensor comes back as
a NumPy array in its storage's dtype (float64, float32, float16, bfloat16, int64, int32,
int16, int8, uint8, bool), bit for bit: a C-contiguous, writeable copy where it is the only
tensor on its storage and reads no element twice (every tensor of an ordinary state dict),
otherwise, as torch returns it, a read-only view of the one storage (tensors sharing a
storage, broadcasts with stride 0, overlapping views). State dicts come back as
`collections.OrderedDict` (with their `_metadata` attribute), NumPy scalars as NumPy
scalars, and everything else as the plain Python values pickle builds (dicts, lists,
tuples, numbers, strings, bytes, None), nested to any depth (walked without recursion).

Memory is bounded by what the file holds, whatever sizes it declares:
- every storage's byte count is checked against its zip record's size or the bytes left in
  a legacy file before a byte of it is read or allocated; zip records must not share bytes
  (so stored records together are at most the file's size), a deflated record is inflated
  no further than the size the zip declares for it (deflate inflates at most ~1000-fold),
  and other compressions are refused;
- each pickle's opcodes are checked before it is unpickled: a length or memo index it
  declares must fit in its own bytes (CPython's unpickler allocates them before reading),
  so what it builds stays in proportion to its length; objects it references more than
  once are built once and stay shared;
- a tensor is copied out of its storage only when it is the storage's one tensor and reads
  each element at most once, and the storage is released after; every other tensor is a
  view (a negated one views a negated copy of its storage, made once).
In all: at most about twice the storages' bytes, plus a small multiple of the pickles' length.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pathlib
import pickle
import pickletools
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

# Tensors have at most this many dimensions (NumPy 1 allows 32, torch's storages int64
# sizes and strides); sizes, strides, offsets and counts are 64-bit, as in torch.
MAX_DIMS = 32
_INT64 = 2**63
# What NumPy can address: an array's size in bytes must stay below this.
_MAX_BYTES = np.iinfo(np.intp).max

_TRUNCATED = ("the file is truncated or incomplete (an interrupted download?); download or "
              "copy it again")


class _Refused(ValueError):
  """The file asks for something this reader does not build (said as is, after the path)."""


def describe(value: Any) -> str:
  """A short description of `value` (read from a file) for a one-line message: None, bools,
  floats, 64-bit integers and the first 40 characters of strings as they are, the reader's
  own objects by what they stand for, short tuples and lists of those item by item,
  anything else by its type and length. Bounded in length
  and time whatever the value's size or depth (a plain repr is neither)."""
  if value is None or isinstance(value, (bool, float)):
    return repr(value)
  if isinstance(value, int):
    return repr(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
  if isinstance(value, (str, bytes)):
    return repr(value[:40]) + ("..." if len(value) > 40 else "")
  if isinstance(value, _Placeholder):
    return value.description()
  if isinstance(value, np.ndarray):
    return f"an array of shape {value.shape} ({value.dtype})"
  if (type(value) in (tuple, list) and len(value) <= 8 and all(
      v is None or isinstance(v, (bool, int, float, str, bytes, _Placeholder)) for v in value)):
    items = ", ".join(map(describe, value))
    return f"({items}{',' if len(value) == 1 else ''})" if type(value) is tuple else f"[{items}]"
  article = "an" if type(value).__name__[0] in "aeiouAEIOU" else "a"
  items = (f" of {len(value)} item{'s' * (len(value) != 1)}"
           if isinstance(value, (tuple, list, dict, set, frozenset)) else "")
  return f"{article} {type(value).__name__}{items}"


class _Placeholder:
  """Objects this module hands to the unpickler. Pickle's BUILD opcode would set their
  state (or, on a function, its attributes), so they refuse it."""

  __slots__ = ()

  def description(self) -> str:
    return f"a {type(self).__name__.strip('_')}"

  def __setstate__(self, state):
    raise _Refused(f"refuses to set the state of a {type(self).__name__.strip('_')}")


class _Root:
  """A storage as the file holds it: `count` elements of `dtype`. `data` (native byte order)
  once read, `users` the tensors built on it, `negated` its negation once a view needs it."""

  __slots__ = ("dtype", "count", "users", "data", "negated")

  def __init__(self, dtype: np.dtype, count: int):
    self.dtype, self.count, self.users = dtype, count, 0
    self.data: np.ndarray | None = None
    self.negated: np.ndarray | None = None


class _Storage(_Placeholder):
  """A storage (or a legacy view of one): `count` elements from element `offset` of `root`."""

  __slots__ = ("root", "offset", "count")

  def __init__(self, root: _Root, offset: int, count: int):
    self.root, self.offset, self.count = root, offset, count

  def description(self) -> str:
    return "a storage"


class _Tensor(_Placeholder):
  """A tensor to cut from its storage once the storages' data is read; `negated`: PyTorch's
  negative bit (a lazily negated view, saved as the un-negated data and a flag)."""

  __slots__ = ("storage", "offset", "size", "stride", "negated")

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
    self.negated = False

  def description(self) -> str:
    return "a tensor"


class _NumpyDType(_Placeholder):
  """A `numpy.dtype` being unpickled: its name, then (BUILD) its byte order."""

  __slots__ = ("dtype",)

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype

  def description(self) -> str:
    return f"numpy.dtype({self.dtype})"

  def __setstate__(self, state):
    # numpy.dtype.__reduce__'s state for a plain number type: (3, byte order, None, None,
    # None, -1, -1, 0); anything else (fields, subarrays, objects) is not a number.
    if (not isinstance(state, tuple) or len(state) != 8 or not isinstance(state[1], str)
        or state[1] not in "<>|=" or len(state[1]) != 1
        or any(field is not None for field in state[2:5])):
      raise _Refused(f"refuses a numpy.dtype state other than a number's: {describe(state)}")
    self.dtype = self.dtype.newbyteorder(state[1])


class _Global(_Placeholder):
  """An allowed global: calling it builds the value with `function`."""

  __slots__ = ("name", "function")

  def __init__(self, name: str, function: Callable):
    self.name, self.function = name, function

  def description(self) -> str:
    return f"the function {self.name}"

  def __call__(self, *args):
    return self.function(*args)


def _is_int64(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and -_INT64 <= value < _INT64


def _int_tuple(name: str, value) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(map(_is_int64, value)):
    raise _Refused(f"a tensor's {name} is {describe(value)}, not a tuple of 64-bit integers")
  return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride) -> _Tensor:
  """torch._utils._rebuild_tensor: `size` elements of `storage`, `stride` apart (elements)."""
  if not isinstance(storage, _Storage):
    raise _Refused(f"a tensor's storage is {describe(storage)}, not a storage")
  if not _is_int64(storage_offset) or storage_offset < 0:
    raise _Refused(f"a tensor's storage offset is {describe(storage_offset)}")
  size, stride = _int_tuple("size", size), _int_tuple("stride", stride)
  if len(size) != len(stride) or len(size) > MAX_DIMS or min(size + stride, default=0) < 0:
    raise _Refused(f"a tensor has size {describe(size)} and stride {describe(stride)} (at "
                   f"most {MAX_DIMS} dimensions, none negative)")
  storage.root.users += 1
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> _Tensor:
  """torch._utils._rebuild_tensor_v2. requires_grad carries no value; backward hooks are
  not saved (an empty OrderedDict); metadata holds the negative and conjugate bits."""
  tensor = _rebuild_tensor(storage, storage_offset, size, stride)
  if metadata is not None and not isinstance(metadata, dict):
    raise _Refused(f"a tensor's metadata is {describe(metadata)}, not a dict")
  flags = dict(metadata or {})
  tensor.negated = bool(flags.pop("neg", False))
  if any(flags.values()):
    raise _Refused(f"a tensor's metadata sets {describe([k for k, v in flags.items() if v][:8])}"
                   f"; only the negative bit is read")
  if tensor.negated and storage.root.dtype == np.bool_:
    raise _Refused("a bool tensor has the negative bit, which torch does not give one")
  return tensor


def _rebuild_parameter(data, requires_grad, backward_hooks):
  """torch._utils._rebuild_parameter: an nn.Parameter is its tensor."""
  if not isinstance(data, _Tensor):
    raise _Refused(f"a parameter's data is {describe(data)}, not a tensor")
  return data


def _numpy_dtype(name, align=False, copy=True) -> _NumpyDType:
  dtype = np.dtype(name) if isinstance(name, str) else None
  if dtype is None or dtype.kind not in "biufc":
    raise _Refused(f"refuses numpy.dtype({describe(name)}): only number types are read")
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
    raise _Refused(f"refuses _codecs.encode(..., {describe(encoding)})")
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

  def description(self) -> str:
    return f"the type torch.{self.name}"


class _Unpickler(pickle.Unpickler):
  """Resolves `ALLOWED_GLOBALS` and the storage types, refuses every other global, and
  records the storages that persistent ids name (`storages`: root key -> `_Root`)."""

  def __init__(self, file: BinaryIO, legacy: bool):
    super().__init__(file, encoding="utf-8")
    self.legacy = legacy
    self.storages: dict[str, _Root] = {}

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
      raise _Refused(f"refuses the persistent id {describe(pid)} (expected a {expected}-tuple "
                     f"('storage', type, key, location, count{', view' if self.legacy else ''}))")
    storage_type, key, _, count = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise _Refused(f"storage {describe(key)}: type {describe(storage_type)} is not one of "
                     f"torch.{', torch.'.join(STORAGE_DTYPES)}")
    if not isinstance(key, str) or not _is_int64(count) or count < 0:
      raise _Refused(f"refuses the storage id {describe(pid)}")
    known = self.storages.setdefault(key, _Root(storage_type.dtype, count))
    if (known.dtype, known.count) != (storage_type.dtype, count):
      raise _Refused(f"storage {describe(key)} is named as {known.count} x {known.dtype} "
                     f"and as {count} x {storage_type.dtype}")
    view = pid[5] if self.legacy else None
    if view is None:
      return _Storage(known, 0, count)
    # A view of PyTorch < 1.0: (view key, element offset, element count) of the root.
    if not (isinstance(view, tuple) and len(view) == 3 and _is_int64(view[1])
            and _is_int64(view[2]) and view[1] >= 0 and view[2] >= 0
            and view[1] + view[2] <= count):
      raise _Refused(f"storage {describe(key)}: view {describe(view)} lies outside its "
                     f"{count} elements")
    return _Storage(known, view[1], view[2])


class _Bounded:
  """`file` up to byte `end`, as pickletools reads it: a counted argument is read with one
  read(n), which a plain file allocates in full before reading."""

  def __init__(self, file: BinaryIO, end: int):
    self.file, self.end = file, end

  def tell(self) -> int:
    return self.file.tell()

  def read(self, n: int = -1) -> bytes:
    left = max(self.end - self.file.tell(), 0)
    return self.file.read(left if n < 0 else min(n, left))

  def readline(self) -> bytes:
    return self.file.readline(max(self.end - self.file.tell(), 0))


def _pickle_at(file: BinaryIO, end: int, in_checkpoint: bool) -> bytes:
  """The pickle at `file`'s position (which ends before byte `end`), its opcodes checked.

  CPython's unpickler allocates what a counted opcode (BINBYTES, BINBYTES8, BYTEARRAY8)
  declares, and a memo as long as the largest index PUT names, before reading on: a few
  bytes could ask for terabytes. Here each count must fit in the bytes left (pickletools
  reads them, bounded) and each memo index be below the pickle's length, as pickle itself
  numbers them. `in_checkpoint`: the file is known to be a checkpoint, so a pickle cut off
  at its end means a truncated file.
  """
  start = file.tell()
  try:
    for opcode, argument, position in pickletools.genops(_Bounded(file, end)):
      if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and not (
          0 <= argument <= position - start):
        raise _Refused(f"its pickle stores memo entry {argument} at byte {position - start} "
                       f"(pickle numbers them from 0); not a checkpoint torch wrote")
  except _Refused:
    raise
  except ValueError as error:  # what pickletools raises for bytes that are not a pickle
    if in_checkpoint and file.tell() >= end:
      raise _Refused(f"ends inside a pickle: {_TRUNCATED}") from None
    raise _Refused(f"not a readable PyTorch checkpoint (its pickle: {error})") from None
  length = file.tell() - start
  file.seek(start)
  return file.read(length)


def _unpickle(data: bytes, legacy: bool) -> tuple[Any, dict[str, _Root]]:
  unpickler = _Unpickler(io.BytesIO(data), legacy=legacy)
  return unpickler.load(), unpickler.storages


def _native(raw: bytes, dtype: np.dtype) -> np.ndarray:
  """`raw` as elements of `dtype` (byte order as stored) in the native byte order."""
  return np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="), copy=False)


def _record(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
  """A zip record's bytes: `info.file_size` of them at most, whatever its data inflates to
  (ZipFile.read inflates in steps of up to 1 GiB before cutting to the declared size)."""
  if info.flag_bits & 0x1:
    raise _Refused(f"record {describe(info.filename)} is encrypted")
  if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
    raise _Refused(f"record {describe(info.filename)} is compressed with zip method "
                   f"{info.compress_type}; torch reads stored and deflated records only")
  with archive.open(info) as stream:
    data = stream.read(info.file_size)
  if len(data) != info.file_size:
    raise _Refused(f"record {describe(info.filename)} holds {len(data)} of the "
                   f"{info.file_size} bytes its entry declares; {_TRUNCATED}")
  return data


def _check_disjoint(file: BinaryIO, infos: list[zipfile.ZipInfo]) -> None:
  """Refuses records that share bytes (each local header and data after the last): a zip
  bomb's many entries over one stretch of data would each be read in full."""
  spans = []
  for info in infos:
    file.seek(info.header_offset + 26)
    lengths = file.read(4)
    if len(lengths) != 4:
      raise _Refused(f"record {describe(info.filename)} lies past the end; {_TRUNCATED}")
    name_length, extra_length = struct.unpack("<HH", lengths)
    end = info.header_offset + 30 + name_length + extra_length + info.compress_size
    spans.append((info.header_offset, end, info.filename))
  spans.sort()
  for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
    if start < end:
      raise _Refused(f"records {describe(name)} and {describe(other)} share bytes; a zip "
                     f"whose records overlap (a zip bomb) is not read")


def _read_zip(archive: zipfile.ZipFile, file: BinaryIO):
  pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
  if len(pickles) != 1:
    names = archive.namelist()
    if any(n.endswith("/constants.pkl") for n in names):
      raise _Refused("is a TorchScript archive (torch.jit.save), not a checkpoint; save the "
                     "model's state_dict() with torch.save")
    raise _Refused(f"is a zip archive without one top-level <folder>/data.pkl (first "
                   f"entries: {describe(names[:3])}); not a PyTorch checkpoint")
  folder = pickles[0][:-len("data.pkl")]
  names = set(archive.namelist())
  records = [archive.getinfo(pickles[0])]
  order = "little"
  if f"{folder}byteorder" in names:
    records.append(archive.getinfo(f"{folder}byteorder"))
    if records[-1].file_size > len("little"):
      raise _Refused(f"byteorder record holds {records[-1].file_size} bytes, expected "
                     f"'little' or 'big'")
    order = _record(archive, records[-1]).decode("ascii", "replace")
    if order not in ("little", "big"):
      raise _Refused(f"byteorder record is {order!r}, expected 'little' or 'big'")
  data = _record(archive, records[0])
  result, roots = _unpickle(_pickle_at(io.BytesIO(data), len(data), in_checkpoint=True),
                            legacy=False)
  del data
  storages = []
  for key, root in roots.items():
    name = f"{folder}data/{key}"
    if name not in names:
      raise _Refused(f"has no record {describe(name)} for storage {describe(key)}")
    info = archive.getinfo(name)
    if info.file_size != root.count * root.dtype.itemsize:  # before a byte is read
      raise _Refused(f"storage {describe(key)} holds {info.file_size} bytes, expected "
                     f"{root.count} x {root.dtype.itemsize} ({root.dtype}); is the file "
                     f"truncated?")
    storages.append((root, info))
  _check_disjoint(file, records + [info for _, info in storages])
  for root, info in storages:
    root.data = _native(_record(archive, info),
                        root.dtype.newbyteorder("<" if order == "little" else ">"))
  return result


def _read_legacy(file: BinaryIO, end: int):
  def header():
    return _unpickle(_pickle_at(file, end, in_checkpoint=True), legacy=True)[0]

  magic = _unpickle(_pickle_at(file, end, in_checkpoint=False), legacy=True)[0]
  if magic != LEGACY_MAGIC:
    raise _Refused("does not start with PyTorch's magic number; not a PyTorch checkpoint")
  protocol = header()
  if protocol != LEGACY_PROTOCOL:
    raise _Refused(f"has legacy protocol version {describe(protocol)}, expected "
                   f"{LEGACY_PROTOCOL}")
  header()  # sys info: the writer's byte order and C type sizes, which the data does not use
  result, roots = _unpickle(_pickle_at(file, end, in_checkpoint=True), legacy=True)
  keys = header()
  if (not isinstance(keys, list) or not all(isinstance(key, str) for key in keys)
      or sorted(keys) != sorted(roots)):
    raise _Refused(f"lists the storages {describe(keys)} but its object names "
                   f"{describe(sorted(roots))}")
  for key in keys:
    root = roots[key]
    if end - file.tell() < 8:
      raise _Refused(f"ends before storage {describe(key)}; {_TRUNCATED}")
    (stored,) = struct.unpack("<q", file.read(8))
    if stored != root.count:
      raise _Refused(f"storage {describe(key)} holds {stored} elements, its tensors name "
                     f"{root.count}; is the file truncated?")
    needed = root.count * root.dtype.itemsize
    if needed > end - file.tell():
      raise _Refused(f"storage {describe(key)} holds {end - file.tell()} bytes, expected "
                     f"{root.count} x {root.dtype.itemsize} ({root.dtype}); {_TRUNCATED}")
    root.data = _native(file.read(needed), root.dtype.newbyteorder("<"))
  return result


def _reads_each_element_once(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
  """Whether no two indices of a (non-empty) tensor reach one element: with the dimensions
  in order of stride, each stride must pass the span of those before it. (A few
  interleaved layouts that also read each element once fail this; they stay views.)"""
  reach = 0
  for step, count in sorted((s, n) for n, s in zip(size, stride) if n > 1):
    if step <= reach:
      return False
    reach += (count - 1) * step
  return True


def _array(tensor: _Tensor) -> np.ndarray:
  """The tensor's elements, after checking that every element its size and strides reach
  lies inside its storage: a copy where it is its storage's one tensor and reads each
  element once (the storage is then released), else a read-only view of the storage."""
  storage, root = tensor.storage, tensor.storage.root
  size, stride, itemsize = tensor.size, tensor.stride, root.dtype.itemsize
  if math.prod(n for n in size if n) * itemsize > _MAX_BYTES:
    raise _Refused(f"a tensor of size {size} would hold more bytes than an array can")
  if 0 in size:
    return np.zeros(size, root.dtype.newbyteorder("="))
  last = tensor.offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.count:
    raise _Refused(f"a tensor of size {size}, stride {stride} and offset "
                   f"{tensor.offset} reads past its storage's {storage.count} elements")
  copy = root.users == 1 and _reads_each_element_once(size, stride)
  base = root.data
  if tensor.negated and not copy:
    if root.negated is None:
      root.negated = np.negative(root.data)
      root.negated.flags.writeable = False
    base = root.negated
  # A dimension of one element has no step; its stride may be anything torch allowed.
  view = np.lib.stride_tricks.as_strided(
      base[storage.offset + tensor.offset:], shape=size,
      strides=[s * itemsize if n > 1 else 0 for n, s in zip(size, stride)], writeable=False)
  if not copy:
    return view
  root.data = None
  return np.negative(view, order="C") if tensor.negated else np.array(view, order="C")


def _resolve(root: Any) -> Any:
  """`root` with every tensor replaced by its array.

  Walked with a stack, not recursion, so any depth reads; each container is visited once
  however often it is referenced, so shared references stay shared and cycles stay cycles:
  lists, dicts and an OrderedDict's attributes (`_metadata`) change in place, and a tuple
  holding a tensor (directly or through tuples, which cannot form cycles) is rebuilt once.
  A tensor in a dict key or a set member is refused (an array is not hashable), as is any
  other placeholder anywhere.
  """
  seen: dict[int, Any] = {}  # id -> container (held, so that no id is reused meanwhile)
  replaced: dict[int, tuple[Any, Any]] = {}  # id of a tensor or tuple -> (it, replacement)
  hashed: list[Any] = []  # dict keys and set members
  stack = [root]
  while stack:
    value = stack.pop()
    if isinstance(value, _Tensor):
      if id(value) not in replaced:
        replaced[id(value)] = (value, _array(value))
      continue
    if isinstance(value, _Placeholder):
      raise _Refused(f"{describe(value)} stands where a value should")
    if not isinstance(value, (list, dict, tuple, set, frozenset)) or id(value) in seen:
      continue
    seen[id(value)] = value
    if isinstance(value, dict):
      hashed.extend(value)
      stack.extend(value)
      stack.extend(value.values())
      if isinstance(value, collections.OrderedDict):
        stack.append(vars(value))  # torch's `_metadata`, or what BUILD set
    else:
      if isinstance(value, (set, frozenset)):
        hashed.extend(value)
      stack.extend(value)

  def new(item):
    entry = replaced.get(id(item))
    return item if entry is None else entry[1]

  settled: set[int] = set()
  for value in seen.values():
    if type(value) is not tuple:
      continue
    pending = [(value, False)]
    while pending:  # post-order: a tuple's tuples before it
      item, ready = pending.pop()
      if id(item) in settled:
        continue
      if ready:
        items = tuple(map(new, item))
        if any(a is not b for a, b in zip(items, item)):
          replaced[id(item)] = (item, items)
        settled.add(id(item))
      else:
        pending.append((item, True))
        pending.extend((x, False) for x in item if type(x) is tuple and id(x) not in settled)
  if any(id(key) in replaced for key in hashed):
    raise _Refused("a tensor is a dict key or a set member, or part of one; tensors are "
                   "read as arrays, which cannot be")
  for value in seen.values():
    if isinstance(value, list) and any(id(x) in replaced for x in value):
      value[:] = map(new, value)
    elif isinstance(value, dict):
      for key, item in [(k, v) for k, v in value.items() if id(v) in replaced]:
        value[key] = new(item)
  return new(root)


def read_pth(path: str | os.PathLike) -> Any:
  """The object a PyTorch checkpoint file holds, built without PyTorch.

  Reads both of torch.save's formats (see the module docstring, which also states the
  memory a file can take). Tensors are NumPy arrays (their own dtype; copies, or read-only
  views where tensors share a storage or read an element twice); dicts, OrderedDicts,
  lists, tuples, numbers, strings and NumPy scalars are as saved. Raises FileNotFoundError
  for a missing file and ValueError, naming the file, in one line, for anything else:
  another format, a truncated file, a size the file does not hold, or a global outside
  `ALLOWED_GLOBALS` (named in the message; nothing it asks for is run).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: checkpoint file not found")
  try:
    with path.open("rb") as file:
      size = os.fstat(file.fileno()).st_size
      head = file.read(262)
      file.seek(0)
      if zipfile.is_zipfile(file):
        with zipfile.ZipFile(file) as archive:
          result = _read_zip(archive, file)
      elif head.startswith(b"PK\x03\x04"):
        raise _Refused(f"is a zip archive cut short (it lacks the directory a zip ends "
                       f"with): {_TRUNCATED}")
      elif head[257:262] == b"ustar":
        raise _Refused("is in PyTorch's tar format (before 1.0), which is not read; load "
                       "it with torch and save it again")
      else:
        file.seek(0)
        result = _read_legacy(file, size)
    return _resolve(result)
  except _Refused as error:
    raise ValueError(f"{path}: {error}") from None
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
          KeyError, IndexError, AttributeError, OverflowError, struct.error) as error:
    # What a damaged or foreign file makes pickle or zipfile raise.
    raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: "
                     f"{str(error)[:200]})") from None
