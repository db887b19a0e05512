"""Hostile and damaged .pth files, made without torch by tests/pth_writer.py.

What a file declares (sizes, views, nesting, shared references) must not cost more memory
than what it holds: the cases that would take gigabytes are read in a subprocess under an
address-space limit a little above the interpreter's own. Every refusal is one line naming
the file, from `read_pth` and from `a2u-convert` (rc 2, nothing written), and what
`read_pth` returns holds no internal placeholder.
"""

import collections
import io
import json
import pathlib
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from a2u_jax import convert, pth
from tests import in_process, pth_writer as writer
from tests.conftest import random_torch_state_dict

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORMATS = ("zip", "legacy")
# Address space the reads may take above the interpreter's after its imports: a file's
# real content here is a few MB, what the hostile files declare 0.5 GB to exabytes.
MARGIN_MB = 192

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the memory bound is measured with /proc and RLIMIT_AS")

# Reads each file given (or converts the one given) with RLIMIT_AS at the interpreter's
# address space after importing, plus MARGIN: a MemoryError (a traceback, rc 1) would fail.
_BOUNDED = r"""
import json, resource, sys
from a2u_jax import convert, pth

def address_space():
  with open("/proc/self/status") as status:
    return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))

margin, mode, *paths = sys.argv[1:]
limit = address_space() + int(margin) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
if mode == "convert":
  convert.main(["--torch", paths[0], "--out", paths[0] + ".out"])
for path in paths:
  try:
    loaded = pth.read_pth(path)
  except ValueError as error:
    print(json.dumps({"refused": str(error)}))
    continue
  print(json.dumps({"count": len(loaded), "arrays": {
      key: [value.shape, value.strides, value.flags.writeable,
            float(value[(0,) * value.ndim])]
      for key, value in sorted(loaded.items())[:3]}}))
"""


def _bounded(mode: str, *paths: pathlib.Path) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", _BOUNDED, str(MARGIN_MB), mode, *map(str, paths)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def _bounded_reads(paths: list[pathlib.Path]) -> list[dict]:
  process = _bounded("read", *paths)
  assert process.returncode == 0, process.stderr[-3000:]
  return [json.loads(line) for line in process.stdout.splitlines()]


def _refused(path: pathlib.Path) -> str:
  """read_pth's one-line message for `path`, after the path."""
  with pytest.raises(ValueError) as raised:
    pth.read_pth(path)
  message = str(raised.value)
  assert "\n" not in message and message.startswith(f"{path}: "), message
  return message[len(f"{path}: "):]


def _named(items: dict[str, bytes]) -> bytes:
  return writer.dictionary([(writer.text(key), value) for key, value in items.items()])


def _one(key: str, tensor: bytes) -> bytes:
  return _named({key: tensor})


def _floats(n: int, start: float = 0.0) -> np.ndarray:
  return np.arange(start, start + n, dtype=np.float32)


# ------------------------------------------------------------ views: memory and values


def _view_files(tmp_path: pathlib.Path, kind: str) -> dict[str, pathlib.Path]:
  """Tensors that read far more elements than their storages hold (each would take 1-4 GB
  copied): a broadcast, an overlapping (sliding-window) view, 300 tensors on one storage,
  and 300 negated ones."""
  legacy = kind == "legacy"
  files = {}
  tensor = writer.tensor("0", "FloatStorage", 1, (10**9,), (0,), legacy=legacy)
  files["broadcast"] = writer.write_pickle(tmp_path / f"broadcast_{kind}.pth", _one("w", tensor),
                                           {"0": np.float32([1.5])}, legacy=legacy)
  tensor = writer.tensor("0", "FloatStorage", 40_000, (20_000, 20_000), (1, 1), legacy=legacy)
  files["overlapping"] = writer.write_pickle(tmp_path / f"overlapping_{kind}.pth",
                                             _one("w", tensor), {"0": _floats(40_000)},
                                             legacy=legacy)
  for negated in (False, True):
    name = "negated" if negated else "shared"
    tensors = {f"w{i:03d}": writer.tensor("0", "FloatStorage", 10**6, (10**6,), (1,),
                                          legacy=legacy, negated=negated) for i in range(300)}
    files[name] = writer.write_pickle(tmp_path / f"{name}_{kind}.pth", _named(tensors),
                                      {"0": _floats(10**6, 2.0)}, legacy=legacy)
  return files


@linux_only
def test_views_reading_more_than_their_storage_stay_views_in_bounded_memory(tmp_path):
  files = {f"{kind}/{name}": path for kind in FORMATS
           for name, path in _view_files(tmp_path, kind).items()}
  results = dict(zip(files, _bounded_reads(list(files.values()))))
  for kind in FORMATS:
    assert results[f"{kind}/broadcast"] == {
        "count": 1, "arrays": {"w": [[10**9], [0], False, 1.5]}}
    assert results[f"{kind}/overlapping"] == {
        "count": 1, "arrays": {"w": [[20_000, 20_000], [4, 4], False, 0.0]}}
    for name, first in (("shared", 2.0), ("negated", -2.0)):
      assert results[f"{kind}/{name}"] == {"count": 300, "arrays": {
          f"w{i:03d}": [[10**6], [4], False, first] for i in range(3)}}


@pytest.mark.parametrize("kind", FORMATS)
def test_views_hold_the_storages_values_and_a_lone_tensor_is_a_copy(kind, tmp_path):
  legacy = kind == "legacy"
  base = _floats(12, 1.0)
  tensors = {
      "windows": writer.tensor("0", "FloatStorage", 12, (10, 3), (1, 1), legacy=legacy),
      "row": writer.tensor("0", "FloatStorage", 12, (4,), (1,), offset=4, legacy=legacy),
      "negated": writer.tensor("0", "FloatStorage", 12, (2, 2), (1, 4), offset=1,
                               legacy=legacy, negated=True),
      "alone": writer.tensor("1", "FloatStorage", 6, (3, 2), (1, 3), legacy=legacy),
      "alone_broadcast": writer.tensor("2", "FloatStorage", 2, (2, 5), (1, 0), legacy=legacy),
  }
  path = writer.write_pickle(tmp_path / "views.pth", _named(tensors),
                             {"0": base, "1": _floats(6), "2": _floats(2, 7.0)}, legacy=legacy)
  state = pth.read_pth(path)
  np.testing.assert_array_equal(state["windows"],
                                np.lib.stride_tricks.sliding_window_view(base, 3))
  np.testing.assert_array_equal(state["row"], base[4:8])
  np.testing.assert_array_equal(state["negated"], -base[1:9].reshape(2, 4)[:, :2].T)
  np.testing.assert_array_equal(state["alone"], _floats(6).reshape(2, 3).T)
  np.testing.assert_array_equal(state["alone_broadcast"], np.repeat([[7.0], [8.0]], 5, 1))
  for name in ("windows", "row", "negated", "alone_broadcast"):
    assert not state[name].flags.writeable
  assert np.shares_memory(state["windows"], state["row"])
  assert state["alone"].flags.writeable and state["alone"].flags.c_contiguous


# ------------------------------------------------- sizes checked before reading


def _deflated_zeros(path: pathlib.Path, count: int, megabytes: int) -> pathlib.Path:
  """A zip whose storage '0' declares `count` float32 elements and whose record holds
  `megabytes` MB of zeros, deflated (~0.1% of that in the file)."""
  body = _one("w", writer.tensor("0", "FloatStorage", count, (count,), (1,)))
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
    archive.writestr("archive/data.pkl", pickle.PROTO + b"\x02" + body + pickle.STOP)
    with archive.open("archive/data/0", "w") as record:
      for _ in range(megabytes // 16):
        record.write(bytes(16 << 20))
  return path


def _sized_files(tmp_path: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
  """Files that declare what they do not hold, and the message each gets."""
  files = {}

  def add(name: str, body: bytes, storages=None, message: str = "", **options):
    files[name] = (writer.write_pickle(tmp_path / f"{name}.pth", body, storages, **options),
                   message)

  huge = 2**62
  big_count = writer.tensor("0", "FloatStorage", huge, (4,), (1,))
  add("zip_count", _one("w", big_count), {"0": _floats(1)},
      rf"storage '0' holds 4 bytes, expected {huge} x 4 \(float32\); is the file truncated\?")
  add("legacy_count", _one("w", writer.tensor("0", "FloatStorage", huge, (4,), (1,),
                                              legacy=True)),
      {"0": _floats(1)}, rf"storage '0' holds 4 bytes, expected {huge} x 4 \(float32\); the "
      rf"file is truncated or incomplete", legacy=True, counts={"0": huge})
  add("count_past_int64", _one("w", writer.tensor("0", "FloatStorage", 2**70, (1,), (1,))),
      {"0": _floats(1)}, r"refuses the storage id \('storage', the type torch.FloatStorage, "
                         r"'0', 'cpu', an integer of 71 bits\)")
  add("size_past_int64", _one("w", writer.tensor("0", "FloatStorage", 1, (2**64,), (1,))),
      {"0": _floats(1)}, r"a tensor's size is \(an integer of 65 bits,\), not a tuple of "
                         r"64-bit integers")
  add("elements_past_memory", _one("w", writer.tensor("0", "FloatStorage", 1, (2**40, 2**40),
                                                      (0, 0))),
      {"0": _floats(1)}, r"a tensor of size \(1099511627776, 1099511627776\) would hold more "
                         r"bytes than an array can")
  add("empty_past_memory", _one("w", writer.tensor("0", "FloatStorage", 0, (0, 2**62), (1, 1))),
      {"0": _floats(0)}, r"a tensor of size \(0, 4611686018427387904\) would hold more bytes")
  add("dimensions", _one("w", writer.tensor("0", "FloatStorage", 1, (1,) * 40, (1,) * 40)),
      {"0": _floats(1)}, r"a tensor has size a tuple of 40 items and stride a tuple of 40 "
                         r"items \(at most 32 dimensions, none negative\)")
  # CPython's unpickler allocates a BINBYTES8's declared length, and a memo up to the
  # largest PUT index, before reading on.
  add("binbytes8", _one("w", b"\x8e" + struct.pack("<Q", 2**40) + b"abcd"), None,
      r"ends inside a pickle: the file is truncated or incomplete")
  add("bytearray8", _one("w", b"\x96" + struct.pack("<Q", 2**33) + b"abcd"), None,
      r"ends inside a pickle: the file is truncated or incomplete")
  add("memo_index", _one("w", pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 2**31)),
      None, r"its pickle stores memo entry 2147483648 at byte \d+ \(pickle numbers them")
  # A deflated record of 512 MB of zeros where the storage declares 1 element: refused on
  # its declared size; then the same record declaring 4 bytes (its data unchanged): read no
  # further than those 4 bytes, whose checksum then fails.
  files["deflated_record"] = (_deflated_zeros(tmp_path / "deflated.pth", 1, 512),
                              r"storage '0' holds 536870912 bytes, expected 1 x 4 \(float32\)")
  lying = tmp_path / "deflated_lying.pth"
  shutil.copy(files["deflated_record"][0], lying)
  writer.set_declared_size(lying, "archive/data/0", 4)
  files["deflated_lying"] = (lying, r"not a readable PyTorch checkpoint \(BadZipFile: Bad "
                                    r"CRC-32 for file 'archive/data/0'\)")
  # 100 stored records nested in one another over one 8 MB payload (~800 MB declared).
  keys = [f"k{i:02d}" for i in range(100)]
  nested = tmp_path / "overlapping_records.pth"
  sizes = writer.write_overlapping_zip(nested, b"", keys, bytes(8 << 20))
  writer.write_overlapping_zip(nested, _named({
      key: writer.tensor(key, "ByteStorage", size, (size,), (1,))
      for key, size in zip(keys, sizes)}), keys, bytes(8 << 20))
  files["overlapping_records"] = (nested, r"records 'archive/data/k00' and "
                                          r"'archive/data/k01' share bytes")
  return files


@linux_only
def test_sizes_a_file_does_not_hold_are_refused_before_reading_in_bounded_memory(tmp_path):
  files = _sized_files(tmp_path)
  results = _bounded_reads([path for path, _ in files.values()])
  for (name, (path, message)), result in zip(files.items(), results):
    assert "refused" in result, (name, result)
    assert result["refused"].startswith(f"{path}: "), (name, result)
    assert re.search(message, result["refused"]), (name, result)


def test_records_sharing_bytes_are_refused(tmp_path):
  keys = [f"k{i:02d}" for i in range(3)]
  path = tmp_path / "overlap.pth"
  sizes = writer.write_overlapping_zip(path, b"", keys, bytes(16))
  body = _named({key: writer.tensor(key, "ByteStorage", size, (size,), (1,))
                 for key, size in zip(keys, sizes)})
  writer.write_overlapping_zip(path, body, keys, bytes(16))
  # zipfile itself reads each record (3.11 does not look for overlaps).
  with zipfile.ZipFile(path) as archive:
    assert [len(archive.read(f"archive/data/{key}")) for key in keys] == sizes
  assert _refused(path) == ("records 'archive/data/k00' and 'archive/data/k01' share bytes; "
                            "a zip whose records overlap (a zip bomb) is not read")


def test_deflated_records_read_as_stored_ones_and_other_compressions_are_refused(tmp_path):
  state = {"a": _floats(6).reshape(2, 3), "b": np.arange(4, dtype=np.int64)}
  stored = writer.write_pth(tmp_path / "stored.pth", state)
  deflated = tmp_path / "deflated.pth"
  with zipfile.ZipFile(stored) as source, zipfile.ZipFile(deflated, "w",
                                                          zipfile.ZIP_DEFLATED) as target:
    for name in source.namelist():
      target.writestr(name, source.read(name))
  for key, value in pth.read_pth(deflated)["state_dict"].items():
    np.testing.assert_array_equal(value, state[key])
  body = _one("w", writer.tensor("0", "FloatStorage", 1, (1,), (1,)))
  bzip2 = writer.write_pickle(tmp_path / "bzip2.pth", body, {"0": _floats(1)},
                              compression=zipfile.ZIP_BZIP2)
  assert _refused(bzip2) == ("record 'archive/byteorder' is compressed with zip method 12; "
                             "torch reads stored and deflated records only")


# ------------------------------------------------------------------ nesting, placeholders


def _nested_list(depth: int, item: bytes) -> bytes:
  """[[[...item...]]], `depth` lists deep, without a pickler that would recurse."""
  return pickle.MARK * depth + item + pickle.LIST * depth


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("depth", [3000, 100_000])
def test_nesting_of_any_depth_reads_and_its_tensors_become_arrays(kind, depth, tmp_path):
  legacy = kind == "legacy"
  deep_tuple = pickle.MARK * depth + writer.tensor("0", "FloatStorage", 2, (2,), (1,),
                                                   legacy=legacy) + pickle.TUPLE * depth
  body = _named({"lists": _nested_list(depth, writer.tensor(
      "0", "FloatStorage", 2, (2,), (1,), legacy=legacy)), "tuples": deep_tuple})
  path = writer.write_pickle(tmp_path / "deep.pth", body, {"0": _floats(2, 3.0)}, legacy=legacy)
  loaded = pth.read_pth(path)
  for name, container in (("lists", list), ("tuples", tuple)):
    value = loaded[name]
    for _ in range(depth):
      assert type(value) is container and len(value) == 1
      value = value[0]
    np.testing.assert_array_equal(value, [3.0, 4.0])


def test_tensors_in_tuples_metadata_and_cycles_become_arrays(tmp_path):
  t = writer.tensor("0", "FloatStorage", 3, (3,), (1,))
  metadata_state = writer.dictionary([(writer.text("_metadata"), writer.dictionary(
      [(writer.text("layer"), writer.dictionary([(writer.text("version"), t)]))]))])
  ordered = (b"ccollections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE +
             metadata_state + pickle.BUILD)
  shared = pickle.MARK + t + pickle.TUPLE + pickle.BINPUT + b"\x07"
  # l = [l, (([t], t),)]: a list that holds itself, and a tuple to rebuild in it.
  cycle = (pickle.EMPTY_LIST + pickle.BINPUT + b"\x08" + pickle.MARK + pickle.BINGET + b"\x08" +
           pickle.MARK + pickle.MARK + pickle.EMPTY_LIST + pickle.MARK + t + pickle.APPENDS +
           t + pickle.TUPLE + pickle.TUPLE + pickle.APPENDS)
  body = _named({"ordered": ordered, "shared": shared,
                 "shared_again": pickle.BINGET + b"\x07", "cycle": cycle})
  path = writer.write_pickle(tmp_path / "placeholders.pth", body, {"0": _floats(3)})
  loaded = pth.read_pth(path)
  assert type(loaded["ordered"]) is collections.OrderedDict
  np.testing.assert_array_equal(loaded["ordered"]._metadata["layer"]["version"], [0, 1, 2])
  assert type(loaded["shared"]) is tuple and isinstance(loaded["shared"][0], np.ndarray)
  assert loaded["shared_again"] is loaded["shared"]  # rebuilt once, still one tuple
  cycle = loaded["cycle"]
  assert cycle[0] is cycle
  np.testing.assert_array_equal(cycle[1][0][0][0], [0, 1, 2])
  np.testing.assert_array_equal(cycle[1][0][1], [0, 1, 2])
  # The walk left nothing of the reader's own behind.
  stack, seen = [loaded], set()
  while stack:
    value = stack.pop()
    assert not isinstance(value, pth._Placeholder), value
    if isinstance(value, (list, tuple, dict)) and id(value) not in seen:
      seen.add(id(value))
      stack.extend(value.values() if isinstance(value, dict) else value)
      stack.extend(vars(value).values() if isinstance(value, collections.OrderedDict) else [])


@pytest.mark.parametrize("where", ["tuple_key", "set_member"])
def test_a_tensor_inside_a_key_or_set_is_refused_in_one_line(where, tmp_path):
  t = writer.tensor("0", "FloatStorage", 1, (1,), (1,))
  if where == "tuple_key":
    body = writer.dictionary([(pickle.MARK + writer.text("a") + t + pickle.TUPLE,
                               writer.text("b"))])
  else:
    body = pickle.EMPTY_SET + pickle.MARK + pickle.MARK + t + pickle.TUPLE + pickle.ADDITEMS
  path = writer.write_pickle(tmp_path / f"{where}.pth", body, {"0": _floats(1)})
  assert _refused(path) == ("a tensor is a dict key or a set member, or part of one; tensors "
                            "are read as arrays, which cannot be")


# ---------------------------------------------------------------- truncation


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("keep", [0.03, 0.3, 0.9])  # legacy: in the object pickle, the data
def test_a_file_cut_short_is_called_truncated(kind, keep, tmp_path):
  path = writer.write_pth(tmp_path / "full.pth", {"a": _floats(1000), "b": _floats(3)},
                          legacy=kind == "legacy")
  cut = tmp_path / "cut.pth"
  data = path.read_bytes()
  cut.write_bytes(data[:int(len(data) * keep)])
  assert "the file is truncated or incomplete" in _refused(cut)


# ---------------------------------------------------------------- a2u-convert


def _nested_references() -> bytes:
  """The issue's 219-byte pickle body: l = [1] * 10, then 7 times l = [l] * 10 (10^8
  elements as an array)."""
  value = [1] * 10
  for _ in range(7):
    value = [value] * 10
  return pickle.dumps({"state_dict": {"w": value}}, protocol=2)[2:-1]


def _convert_cases(tmp_path: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
  t = writer.tensor("0", "FloatStorage", 1, (1,), (1,))
  full = writer.write_pth(tmp_path / "full.pth", random_torch_state_dict("share", seed=1))
  cases = {
      "int_key": (writer.dictionary([(writer._int(3), t)]),
                  "state dict key 3 is not a parameter name (expected a string)"),
      "tuple_key": (writer.dictionary([(pickle.MARK + writer.text("a") + writer._int(1) +
                                        pickle.TUPLE, t)]),
                    "state dict key ('a', 1) is not a parameter name (expected a string)"),
      "string_value": (_one("w", writer.text("abc")),
                       "state dict entry 'w' is 'abc', not a weight (expected an array or a "
                       "number)"),
      "nested_references": (_nested_references(),
                            "state dict entry 'w' is a list of 10 items, not a weight"),
      "deep_nesting": (_one("w", _nested_list(3000, pickle.NONE)),
                       "state dict entry 'w' is a list of 1 item, not a weight"),
  }
  files = {name: (writer.write_pickle(tmp_path / f"{name}.pth", body, {"0": _floats(1)}),
                  message) for name, (body, message) in cases.items()}
  data = full.read_bytes()
  (tmp_path / "truncated.pth").write_bytes(data[:len(data) // 2])
  files["truncated"] = (tmp_path / "truncated.pth",
                        "is a zip archive cut short (it lacks the directory a zip ends with): "
                        "the file is truncated or incomplete")
  return files


def test_convert_refuses_what_is_not_a_state_dict_of_weights_in_one_line(tmp_path):
  # In this process: test_convert_stays_in_bounded_memory runs the same refusal through
  # a2u-convert's own process.
  for name, (path, message) in _convert_cases(tmp_path).items():
    process = in_process.run_main(convert.main, "convert.py", [
        "--torch", str(path), "--out", str(tmp_path / f"{name}_out")])
    lines = process.stderr.splitlines()
    assert process.returncode == 2 and len(lines) == 1, (name, process.stderr[-3000:])
    assert lines[0].startswith(f"convert.py: error: {path}: ") and message in lines[0], (
        name, lines[0])
    assert not (tmp_path / f"{name}_out").exists()


@linux_only
@pytest.mark.parametrize("case", ["nested_references", "broadcast"])
def test_convert_stays_in_bounded_memory(case, tmp_path):
  if case == "nested_references":
    path = writer.write_pickle(tmp_path / "nested.pth", _nested_references())
    message = "state dict entry 'w' is a list of 10 items, not a weight"
  else:
    tensor = writer.tensor("0", "FloatStorage", 1, (10**9,), (0,))
    path = writer.write_pickle(tmp_path / "broadcast.pth", _one("w", tensor), {"0": _floats(1)})
    message = "not an A2U matting checkpoint: no 'bilinear0.bconv_U.1.weight' among its 1 keys"
  process = _bounded("convert", path)
  lines = process.stderr.splitlines()
  assert process.returncode == 2 and len(lines) == 1, process.stderr[-3000:]
  assert f"{path}: " in lines[0] and message in lines[0], lines[0]
  assert not pathlib.Path(f"{path}.out").exists()


def test_only_arrays_and_numbers_are_weights():
  state = random_torch_state_dict("share", seed=2)
  state["module.layer0.1.num_batches_tracked"] = 7  # a Python number is a weight
  convert.from_torch_state_dict(state)
  for value, described in (([[1.0], [2.0]], "a list of 2 items"), ({"a": 1}, "a dict of 1 item"),
                           (np.array(["a"]), "an array of shape (1,) (<U1)"),
                           (2**70, "an integer of 71 bits"), (1j, "a complex")):
    bad = dict(state, **{"module.extra": value})
    with pytest.raises(ValueError, match=rf"^state dict entry 'module.extra' is "
                                         rf"{re.escape(described)}, not a weight"):
      convert.from_torch_state_dict(bad)
  twice = dict(state, **{"layer0.0.weight": state["module.layer0.0.weight"]})
  with pytest.raises(ValueError, match="state dict names 'layer0.0.weight' twice"):
    convert.from_torch_state_dict(twice)


def test_a_kernel_of_the_wrong_rank_is_reported_as_mis_shaped():
  state = random_torch_state_dict("share", seed=2)
  state["module.bilinear0.bconv_V.1.weight"] = np.zeros((1, 64), np.float32)  # a dense kernel
  state["module.pred.1.weight"] = np.zeros(3, np.float32)  # a conv kernel
  with pytest.raises(ValueError, match=r"mis-shaped keys 2: bilinear0.bconv_V.1.weight "
                                       r"\(1, 64\) -> .*pred.1.weight \(3,\)"):
    convert.from_torch_state_dict(state)


def test_an_npz_of_bzip2_members_is_refused_before_inflating(tmp_path):
  buffer = io.BytesIO()
  np.lib.format.write_array(buffer, np.zeros(4, np.float32))
  path = tmp_path / "weights.npz"
  with zipfile.ZipFile(path, "w", zipfile.ZIP_BZIP2) as archive:
    archive.writestr("state_dict/w.npy", buffer.getvalue())
  with pytest.raises(ValueError, match=r"weights.npz: not a readable .npz archive of arrays "
                                       r"\(ValueError: zip compression methods \[12\]: only "
                                       r"stored and deflated members are read\)"):
    convert.load_torch_checkpoint(path)
