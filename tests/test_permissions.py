"""What the project writes gets the permissions the umask gives, as the user's other files
do: 0666 less the umask for files, 0777 less the umask for folders, while still written
atomically (a temporary sibling renamed into place). tempfile's mkstemp and mkdtemp make
0600 files and 0700 folders whatever the umask, which a serving account or a teammate
cannot read."""

import os
import pathlib
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from a2u_jax import convert, evaluate, export, predict
from tests.conftest import random_torch_state_dict


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request) -> int:
  previous = os.umask(request.param)
  yield request.param
  os.umask(previous)


def _assert_umask_modes(root: pathlib.Path, umask: int) -> int:
  """Asserts the mode of `root` and of everything under it; returns how many entries."""
  entries = [root, *root.rglob("*")]
  for path in entries:
    expected = (0o777 if path.is_dir() else 0o666) & ~umask
    actual = stat.S_IMODE(path.lstat().st_mode)
    assert actual == expected, f"{path}: mode {actual:o}, expected {expected:o} (umask {umask:03o})"
  return len(entries)


def test_converted_checkpoints_get_the_umasks_modes(umask, tmp_path):
  source = tmp_path / "random_share.npz"
  np.savez(source, **{f"state_dict/{k}": v for k, v in random_torch_state_dict("share").items()})
  out = tmp_path / "models" / "converted"
  convert.main(["--torch", str(source), "--out", str(out)])
  # model.json, variables/ and orbax's files and folders inside it.
  assert _assert_umask_modes(tmp_path / "models", umask) > 5
  convert.main(["--torch", str(source), "--out", str(out), "--force"])  # replaced in place
  _assert_umask_modes(out, umask)
  assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["converted"]


def test_exported_artifacts_get_the_umasks_modes(umask, tmp_path):
  exported = jax.export.export(jax.jit(jnp.sin))(jax.ShapeDtypeStruct((3,), jnp.float32))
  artifact = export.save_exported(tmp_path / "serving" / "a2u.jaxexport", exported,
                                  {"format_version": export.FORMAT_VERSION})
  export.save_exported(artifact, exported, {"format_version": export.FORMAT_VERSION},
                       force=True)
  _assert_umask_modes(tmp_path / "serving", umask)
  assert sorted(p.name for p in (tmp_path / "serving").iterdir()) == [
      "a2u.jaxexport", "a2u.jaxexport.json"]


def _tiny_folder(root: pathlib.Path) -> pathlib.Path:
  """image/, trimap/ and alpha/ with one 20x24 random example."""
  rng = np.random.default_rng(0)
  trimap = np.full((20, 24), 128, np.uint8)
  trimap[:5], trimap[-5:] = 0, 255
  for kind, array in (("image", rng.integers(0, 256, (20, 24, 3), np.uint8)),
                      ("trimap", trimap), ("alpha", rng.integers(0, 256, (20, 24), np.uint8))):
    (root / kind).mkdir(parents=True)
    Image.fromarray(array).save(root / kind / "cat.png")
  return root


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_predicted_mattes_and_evaluation_outputs_get_the_umasks_modes(
    umask, converted_checkpoint, tmp_path):
  data = _tiny_folder(tmp_path / "data")
  predict.main(["--checkpoint", str(converted_checkpoint), "--image", str(data / "image"),
                "--trimap", str(data / "trimap"), "--out", str(tmp_path / "mattes")])
  assert _assert_umask_modes(tmp_path / "mattes", umask) == 3  # the folder, alpha, preview
  evaluate.main(["--checkpoint", str(converted_checkpoint), "--data", "folder", "--data-dir",
                 str(data), "--out", str(tmp_path / "evaluation"), "--no-progress"])
  written = {p.relative_to(tmp_path / "evaluation").as_posix()
             for p in (tmp_path / "evaluation").rglob("*")}
  assert {"alpha/cat.png", evaluate.METRICS_CSV} <= written
  _assert_umask_modes(tmp_path / "evaluation", umask)
