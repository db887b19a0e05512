"""The torch-free .pth reader (a2u_jax.pth) and a2u-convert's use of it.

tests/data/pth holds checkpoints that PyTorch 2.13 wrote in both formats, with what PyTorch
itself read from them (make_pth.py); tests/pth_writer.py writes full-size checkpoints
without torch. The tests that compare with torch.load skip where torch is not installed.
"""

import collections
import json
import os
import pathlib
import pickle
import re
import struct
import zipfile

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from a2u_jax import convert, pth
from tests import pth_writer
from tests.conftest import random_torch_state_dict

DATA = pathlib.Path(__file__).resolve().parent / "data" / "pth"
EXPECTED = json.loads((DATA / "expected.json").read_text())
FORMATS = ("zip", "legacy")


def _expected_arrays() -> dict[str, np.ndarray]:
  with np.load(DATA / "expected.npz") as archive:
    return {key: archive[key] for key in archive.files}


def _leaf(tree, path: str):
  for part in path.split("/"):
    tree = tree[int(part) if isinstance(tree, dict) and part.isdigit() else part]
  return tree


def _assert_same_bits(actual: np.ndarray, expected: np.ndarray, dtype: str) -> None:
  assert isinstance(actual, np.ndarray)
  assert actual.dtype == (jnp.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))
  assert actual.shape == expected.shape
  assert actual.tobytes() == expected.tobytes()  # bit for bit: -0.0, NaN payloads included


@pytest.mark.parametrize("kind", FORMATS)
def test_checkpoints_written_by_torch_read_back_bit_for_bit(kind):
  checkpoint = pth.read_pth(DATA / f"checkpoint_{kind}.pth")
  expected = _expected_arrays()
  for key, array in expected.items():
    actual = _leaf(checkpoint, key)
    _assert_same_bits(actual, array, EXPECTED["dtypes"][key])
    # Each tensor alone on its storage is a copy of its own; the views of one storage (and
    # that storage's own tensor) are read-only views of it, as torch returns them.
    alone = not key.startswith("state_dict/view.") or key == "state_dict/view.empty"
    assert actual.flags.c_contiguous and actual.flags.writeable if alone else (
        not actual.flags.writeable)
  state = checkpoint["state_dict"]
  assert type(state) is collections.OrderedDict
  assert list(state) == [k[len("state_dict/"):] for k in expected if k.startswith("state_dict/")]
  assert state._metadata == EXPECTED["metadata"]
  for key in ("epoch", "train_loss", "val_loss", "measure"):
    assert checkpoint[key] == EXPECTED[key]
  # The authors' measures are NumPy means; the optimizer's betas a tuple.
  assert type(checkpoint["measure"]["sad"][0]) is np.float64
  assert checkpoint["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
  assert json.loads(json.dumps(checkpoint["optimizer"]["param_groups"])) == (
      EXPECTED["param_groups"])


@pytest.mark.parametrize("kind", FORMATS)
def test_views_of_one_storage_come_back_as_read_only_views_of_it(kind):
  state = pth.read_pth(DATA / f"checkpoint_{kind}.pth")["state_dict"]
  base = state["view.base"]
  np.testing.assert_array_equal(state["view.transposed"], base.T)
  np.testing.assert_array_equal(state["view.offset"], base[1:, 2:5])
  np.testing.assert_array_equal(state["view.expanded"], np.repeat(base[:, :1], 3, axis=1))
  assert state["view.element"].shape == () and state["view.element"] == base[2, 3]
  assert state["view.empty"].shape == (0, 6)
  np.testing.assert_array_equal(state["view.negated"], -base[3])
  # Views, not copies: a broadcast stays a broadcast (stride 0), whatever its size.
  assert state["view.expanded"].strides[1] == 0
  for name in ("view.base", "view.transposed", "view.offset", "view.expanded",
               "view.element"):
    assert not state[name].flags.writeable and np.shares_memory(state[name], base)
  assert not state["view.negated"].flags.writeable


def _big_endian_copy(source: pathlib.Path, target: pathlib.Path, dtypes: dict[str, np.dtype]):
  """`source` (a little-endian zip checkpoint) with its storages byteswapped and a
  byteorder record of "big", as a big-endian machine writes it."""
  with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as swapped:
    for name in original.namelist():
      data = original.read(name)
      key = name.rpartition("/data/")[2] if "/data/" in name else None
      if key in dtypes:
        data = np.frombuffer(data, dtypes[key].newbyteorder("<")).astype(
            dtypes[key].newbyteorder(">")).tobytes()
      elif name.endswith("/byteorder"):
        data = b"big"
      swapped.writestr(name, data)


def test_a_big_endian_zip_reads_as_the_same_numbers(tmp_path):
  rng = np.random.default_rng(0)
  state = {"f32": rng.normal(size=(3, 4)).astype(np.float32),
           "f64": rng.normal(size=5), "f16": rng.normal(size=(2, 2)).astype(np.float16),
           "i64": rng.integers(-2**40, 2**40, size=7)}
  little = pth_writer.write_pth(tmp_path / "little.pth", state)
  _big_endian_copy(little, tmp_path / "big.pth",
                   {str(i): value.dtype for i, value in enumerate(state.values())})
  big = pth.read_pth(tmp_path / "big.pth")["state_dict"]
  for key, value in state.items():
    assert big[key].dtype == value.dtype and big[key].dtype.isnative
    np.testing.assert_array_equal(big[key], value)


def test_legacy_storage_views_of_pytorch_before_1_0(tmp_path):
  """Old files name a tensor's storage as a view (key, element offset, count) of a root."""
  root = np.arange(10, dtype=np.float32)
  storage = pth_writer._tuple([
      pth_writer._text("storage"), pth_writer._global("torch", "FloatStorage"),
      pth_writer._text("root"), pth_writer._text("cpu"), pth_writer._int(10),
      pth_writer._tuple([pth_writer._text("view"), pth_writer._int(2), pth_writer._int(6)])])
  tensor = (pth_writer._global("torch._utils", "_rebuild_tensor") + pth_writer._tuple([
      storage + pickle.BINPERSID, pth_writer._int(1),
      pth_writer._tuple([pth_writer._int(2), pth_writer._int(2)]),
      pth_writer._tuple([pth_writer._int(2), pth_writer._int(1)])]) + pickle.REDUCE)
  path = tmp_path / "views.pth"
  _write_legacy(path, pickle.PROTO + b"\x02" + tensor + pickle.STOP,
                [("root", root.tobytes(), root.size)])
  # Elements 1.. of the view, which starts at element 2 of the root.
  np.testing.assert_array_equal(pth.read_pth(path), [[3, 4], [5, 6]])


def _write_legacy(path: pathlib.Path, object_pickle: bytes,
                  storages: list[tuple[str, bytes, int]]) -> None:
  with path.open("wb") as file:
    for header in (pth.LEGACY_MAGIC, pth.LEGACY_PROTOCOL, {"little_endian": True}):
      pickle.dump(header, file, protocol=2)
    file.write(object_pickle)
    pickle.dump([key for key, _, _ in storages], file, protocol=2)
    for _, data, count in storages:
      file.write(struct.pack("<q", count) + data)


def _write_zip(path: pathlib.Path, object_pickle: bytes) -> None:
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", object_pickle)


class _RunsACommand:
  """What a malicious .pth holds: unpickling it runs a shell command."""

  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


@pytest.mark.parametrize("kind", FORMATS)
def test_a_file_that_would_run_code_is_refused_and_runs_nothing(kind, tmp_path):
  marker = tmp_path / "ran"
  payload = pickle.dumps({"state_dict": _RunsACommand(f"touch {marker}")}, protocol=2)
  pickle.loads(payload)  # the payload is live: plain pickle runs the command
  assert marker.exists()
  marker.unlink()
  path = tmp_path / "evil.pth"
  if kind == "zip":
    _write_zip(path, payload)
  else:
    _write_legacy(path, payload, [])
  with pytest.raises(ValueError, match=rf"evil.pth: refuses to load {os.system.__module__}"
                                       rf"\.system: a \.pth can run code"):
    pth.read_pth(path)
  assert not marker.exists()


def test_a_whole_pickled_model_and_numpy_arrays_are_refused_by_name(tmp_path):
  with pytest.raises(ValueError, match="whole_model_zip.pth: refuses to load "
                                       r"torch\.nn\.modules\.container\.Sequential.*state_dict"):
    pth.read_pth(DATA / "whole_model_zip.pth")
  _write_zip(tmp_path / "array.pth", pickle.dumps({"w": np.zeros(3)}, protocol=2))
  with pytest.raises(ValueError, match=r"refuses to load numpy\._core\.multiarray\._reconstruct"):
    pth.read_pth(tmp_path / "array.pth")


def test_pickle_cannot_rewrite_the_functions_it_is_allowed_to_call(tmp_path):
  # BUILD with a state would set attributes (say __defaults__) of what is on the stack.
  attack = (pickle.PROTO + b"\x02" + pth_writer._global("torch._utils", "_rebuild_tensor_v2") +
            pickle.EMPTY_DICT + pth_writer._text("__defaults__") +
            pth_writer._tuple([pth_writer._int(1)]) + pickle.SETITEM + pickle.BUILD +
            pickle.STOP)
  _write_zip(tmp_path / "build.pth", attack)
  with pytest.raises(ValueError, match="build.pth: refuses to set the state of a Global"):
    pth.read_pth(tmp_path / "build.pth")


def _tensor_pickle(size: tuple[int, ...], stride: tuple[int, ...], count: int) -> bytes:
  storage = pth_writer._tuple([pth_writer._text("storage"),
                               pth_writer._global("torch", "FloatStorage"),
                               pth_writer._text("0"), pth_writer._text("cpu"),
                               pth_writer._int(count), pickle.NONE])  # legacy: no view
  return (pickle.PROTO + b"\x02" + pth_writer._global("torch._utils", "_rebuild_tensor") +
          pth_writer._tuple([storage + pickle.BINPERSID, pth_writer._int(0),
                             pth_writer._tuple(map(pth_writer._int, size)),
                             pth_writer._tuple(map(pth_writer._int, stride))]) +
          pickle.REDUCE + pickle.STOP)


def _damaged(kind: str, tmp_path: pathlib.Path) -> pathlib.Path:
  path = tmp_path / f"{kind}.pth"
  if kind == "truncated_legacy":
    path.write_bytes((DATA / "checkpoint_legacy.pth").read_bytes()[:-10])
  elif kind == "truncated_zip":
    path.write_bytes((DATA / "checkpoint_zip.pth").read_bytes()[:-100])
  elif kind == "text":
    path.write_text("not a checkpoint\n")
  elif kind == "torchscript":
    with zipfile.ZipFile(path, "w") as archive:
      archive.writestr("model/constants.pkl", b"")
      archive.writestr("model/code/__torch__.py", b"")
  elif kind == "tar":
    path.write_bytes(b"\0" * 257 + b"ustar" + b"\0" * 250)
  elif kind == "uint16":  # PyTorch 2 saves the dtypes it added later through _v3
    _write_zip(path, pickle.PROTO + b"\x02" + pth_writer._global("torch._utils",
                                                                 "_rebuild_tensor_v3") +
               pickle.STOP)
  elif kind == "past_storage":  # a 2x3 tensor over a storage of 5 elements
    _write_legacy(path, _tensor_pickle((2, 3), (3, 1), 5),
                  [("0", np.zeros(5, np.float32).tobytes(), 5)])
  return path


@pytest.mark.parametrize("kind,message", [
    ("truncated_legacy", r"storage '\d+' holds \d+ bytes, expected .*; the file is truncated "
                         r"or incomplete \(an interrupted download\?\); download or copy it"),
    ("truncated_zip", r"is a zip archive cut short \(it lacks the directory a zip ends with\): "
                      r"the file is truncated or incomplete"),
    ("text", "not a readable PyTorch checkpoint"),
    ("torchscript", r"is a TorchScript archive \(torch.jit.save\), not a checkpoint"),
    ("tar", r"is in PyTorch's tar format \(before 1.0\)"),
    ("uint16", r"has a tensor of a kind not read \(torch._utils._rebuild_tensor_v3\); dense "
               "tensors of float64, float32, float16, bfloat16, int64"),
    ("past_storage", r"a tensor of size \(2, 3\), stride \(3, 1\) and offset 0 reads past "
                     "its storage's 5 elements"),
])
def test_damaged_and_foreign_files_get_one_clear_error(kind, message, tmp_path):
  path = _damaged(kind, tmp_path)
  with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {message}") as raised:
    pth.read_pth(path)
  assert "\n" not in str(raised.value)
  with pytest.raises(FileNotFoundError, match="missing.pth: checkpoint file not found"):
    pth.read_pth(tmp_path / "missing.pth")


def test_the_test_writer_writes_what_torch_reads(tmp_path):
  torch = pytest.importorskip("torch", reason="checking the writer against torch.load needs "
                                              "torch (extra 'torch')")
  rng = np.random.default_rng(1)
  state = {"a": rng.normal(size=(2, 3, 1, 1)).astype(np.float32), "b": rng.normal(size=4),
           "c": rng.normal(size=3).astype(np.float16), "d": np.array(7, np.int64)}
  for legacy in (False, True):
    path = pth_writer.write_pth(tmp_path / f"{legacy}.pth", state, legacy=legacy)
    loaded = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    ours = pth.read_pth(path)["state_dict"]
    for key, value in state.items():
      assert loaded[key].numpy().tobytes() == value.tobytes() == ours[key].tobytes()
      assert loaded[key].numpy().dtype == value.dtype == ours[key].dtype


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_convert_reads_the_authors_layout_without_torch(legacy, tmp_path):
  state = random_torch_state_dict("share", seed=5)
  path = pth_writer.write_pth(tmp_path / "model_best.pth", state, legacy=legacy)
  tensors = convert.load_torch_checkpoint(path)
  assert sorted(tensors) == sorted(k[len("module."):] for k in state)
  for key, value in state.items():
    assert tensors[key[len("module."):]].tobytes() == value.tobytes()
  chex.assert_trees_all_equal(convert.from_torch_state_dict(tensors),
                              convert.from_torch_state_dict(state))


def test_the_converted_network_equals_the_one_converted_through_torch_load(tmp_path):
  torch = pytest.importorskip("torch", reason="comparing with torch.load needs torch "
                                              "(extra 'torch')")
  state = random_torch_state_dict("unshare", seed=6)
  checkpoint = {"state_dict": {k: torch.from_numpy(v) for k, v in state.items()},
                "epoch": 30, "measure": {"sad": [np.float64(41.5)]}}
  for legacy in (False, True):
    path = tmp_path / f"model_{legacy}.pth"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    through_torch = convert.from_torch_state_dict(
        torch.load(path, map_location="cpu", weights_only=False))
    ours = convert.from_torch_state_dict(convert.load_torch_checkpoint(path))
    chex.assert_trees_all_equal(ours, through_torch)
