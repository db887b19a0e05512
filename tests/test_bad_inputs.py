"""Bad inputs and interruptions get a clear answer, and nothing is silently wrong or lost.

CLI cases check the exit status and that stderr ends in one clear line with no traceback.
"""

import importlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from a2u_jax import evaluate, ops, predict, resamplers
from a2u_jax.training import loop
from data_pipeline import files
from data_pipeline.files import SourceError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, check=False)


def _one_clear_line(process: subprocess.CompletedProcess, message: str) -> None:
  assert process.returncode != 0
  assert "Traceback" not in process.stderr, process.stderr[-2000:]
  last = process.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and message in last, process.stderr[-2000:]


# ----------------------------------------------------------------------- image files


def _scene(height=32, width=48, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (height, width, 3), np.uint8)
  trimap = np.zeros((height, width), np.uint8)
  trimap[:, width // 3:] = 128
  trimap[:, 2 * width // 3:] = 255
  return image, trimap


def test_sixteen_bit_files_are_read_at_their_depth(tmp_path):
  grey = np.array([[0, 257, 32896], [40000, 65280, 65535]], np.uint16)
  Image.fromarray(grey).save(tmp_path / "grey16.png")
  with Image.open(tmp_path / "grey16.png") as im:
    assert im.mode.startswith("I;16")  # what PIL gives for a 16-bit greyscale PNG
  values, dropped = files.read_image(tmp_path / "grey16.png", "grey")
  np.testing.assert_array_equal(values, [[0, 1, 128], [156, 255, 255]])  # the high byte
  assert values.dtype == np.uint8 and not dropped
  rgb, _ = files.read_image(tmp_path / "grey16.png", "rgb")
  np.testing.assert_array_equal(rgb, np.repeat(values[..., None], 3, axis=-1))
  # PIL's own conversion (what was used before) clips everything above 255 to white.
  with Image.open(tmp_path / "grey16.png") as im:
    assert np.asarray(im.convert("L"))[0, 1] == 255


def test_alpha_channels_are_reported_and_undefined_ranges_refused(tmp_path):
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 0], rgba[..., 3] = 200, 10
  Image.fromarray(rgba).save(tmp_path / "rgba.png")
  values, dropped = files.read_image(tmp_path / "rgba.png", "rgb")
  assert dropped and values.shape == (4, 4, 3) and (values[..., 0] == 200).all()
  Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "float.tif")
  with pytest.raises(SourceError, match="float.tif: floating-point images are not supported"):
    files.read_image(tmp_path / "float.tif", "rgb")
  with pytest.raises(SourceError, match="missing.png: file not found"):
    files.read_image(tmp_path / "missing.png", "grey")
  (tmp_path / "junk.png").write_bytes(b"junk")
  with pytest.raises(SourceError, match="junk.png: cannot be read as an image"):
    files.read_image(tmp_path / "junk.png", "grey")


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_predict_reads_sixteen_bit_inputs_and_says_once_that_alpha_is_ignored(
    converted_checkpoint, tmp_path, capsys):
  image, trimap = _scene()
  eight, sixteen = tmp_path / "eight", tmp_path / "sixteen"
  for folder in (eight, sixteen):
    (folder / "image").mkdir(parents=True)
    (folder / "trimap").mkdir()
  # The 16-bit files hold the 8-bit values times 257: they must give the same alphas.
  grey = image[..., 0]
  Image.fromarray(grey).save(eight / "image" / "a.png")
  Image.fromarray(trimap).save(eight / "trimap" / "a.png")
  Image.fromarray(grey.astype(np.uint16) * 257).save(sixteen / "image" / "a.png")
  Image.fromarray(trimap.astype(np.uint16) * 257).save(sixteen / "trimap" / "a.png")
  # Two RGBA images: the notice comes once.
  for name in ("b", "c"):
    for folder in (eight, sixteen):
      Image.fromarray(np.dstack([image, np.full(trimap.shape, 90, np.uint8)])).save(
          folder / "image" / f"{name}.png")
      Image.fromarray(trimap).save(folder / "trimap" / f"{name}.png")
  outputs = {}
  for folder in (eight, sixteen):
    predict.main(["--checkpoint", str(converted_checkpoint), "--image", str(folder / "image"),
                  "--trimap", str(folder / "trimap"), "--out", str(folder / "out")])
    stderr = capsys.readouterr().err
    assert stderr.count("has an alpha channel; it is ignored") == 1
    assert stderr.count("compiling the network for 48x32 inputs") == 1
    outputs[folder] = np.asarray(Image.open(folder / "out" / "a_alpha.png"))
  np.testing.assert_array_equal(outputs[eight], outputs[sixteen])
  assert (outputs[eight][trimap == 255] == 255).all()  # the 16-bit trimap's 255 is known


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_predict_and_evaluate_refuse_an_out_that_is_a_file(converted_checkpoint, tmp_path):
  image, trimap = _scene()
  Image.fromarray(image).save(tmp_path / "image.png")
  Image.fromarray(trimap).save(tmp_path / "trimap.png")
  out = tmp_path / "a_file"
  out.write_text("keep me")
  _one_clear_line(_cli("-m", "a2u_jax.predict", "--checkpoint", str(converted_checkpoint),
                       "--image", str(tmp_path / "image.png"), "--trimap",
                       str(tmp_path / "trimap.png"), "--out", str(out)),
                  f"--out {out}: exists and is not a folder")
  _one_clear_line(_cli("-m", "a2u_jax.evaluate", "--checkpoint", str(converted_checkpoint),
                       "--data", "synthetic", "--out", str(out)),
                  f"--out {out}: exists and is not a folder")
  assert out.read_text() == "keep me"


@pytest.mark.parametrize("argv,message", [
    (["--count", "0"], "--count must be >= 1, got 0"),
    (["--batch-per-device", "0"], "--batch-per-device must be >= 1, got 0"),
])
@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_evaluate_refuses_empty_runs(argv, message, converted_checkpoint, tmp_path):
  _one_clear_line(_cli("-m", "a2u_jax.evaluate", "--checkpoint", str(converted_checkpoint),
                       "--data", "synthetic", "--out", str(tmp_path / "out"), *argv), message)
  assert not (tmp_path / "out").exists()


def test_evaluate_scores_the_images_that_have_an_alpha_and_lists_the_rest(
    converted_checkpoint, tmp_path, capsys):
  for kind in ("image", "trimap", "alpha"):
    (tmp_path / "data" / kind).mkdir(parents=True)
  for index, name in enumerate(("with", "without")):
    image, trimap = _scene(seed=index)
    Image.fromarray(image).save(tmp_path / "data" / "image" / f"{name}.png")
    Image.fromarray(trimap).save(tmp_path / "data" / "trimap" / f"{name}.png")
  Image.fromarray(_scene()[1]).save(tmp_path / "data" / "alpha" / "with.png")
  evaluate.main(["--checkpoint", str(converted_checkpoint), "--data", "folder", "--data-dir",
                 str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--devices", "1",
                 "--no-progress"])
  printed = capsys.readouterr().out
  assert "not scored (no ground-truth alpha): 1 images: without" in printed
  rows = (tmp_path / "out" / "metrics.csv").read_text().splitlines()
  assert rows[1].startswith("with,") and rows[1].split(",")[3] != ""
  assert rows[2].startswith("without,") and rows[2].split(",")[3] == ""


# -------------------------------------------------------------- converter, operators


@pytest.mark.parametrize("name,contents,message", [
    ("missing.pth", None, "missing.pth: checkpoint file not found"),
    ("missing.npz", None, "missing.npz: checkpoint file not found"),
    ("empty.npz", b"", "empty.npz: not a readable .npz archive"),
    ("garbage.npz", b"PK\x03\x04 not really a zip", "garbage.npz: not a readable .npz archive"),
])
@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_convert_names_missing_and_unreadable_files(name, contents, message, tmp_path):
  if contents is not None:
    (tmp_path / name).write_bytes(contents)
  process = _cli("-m", "a2u_jax.convert", "--torch", str(tmp_path / name), "--out",
                 str(tmp_path / "out"))
  assert process.returncode == 2 and "Traceback" not in process.stderr
  assert message in process.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "out").exists()


def test_reassembly_refuses_empty_maps():
  with pytest.raises(ValueError, match="non-zero height, width and channel count"):
    ops.reassemble_up(jnp.zeros((1, 0, 4, 4)), jnp.zeros((1, 0, 8, 9)), kernel_size=3)
  with pytest.raises(ValueError, match="non-zero height, width and channel count"):
    ops.reassemble_down(jnp.zeros((1, 4, 0, 4)), jnp.zeros((1, 2, 0, 36)), kernel_size=6)


@pytest.mark.parametrize("name,options,message", [
    ("carafe", {"groups": 0}, "`groups` must be a positive integer, got 0"),
    ("carafe", {"compressed_channels": 0}, "`compressed_channels` must be a positive"),
    ("carafe", {"up_kernel_size": 4}, "`up_kernel_size` must be odd"),
    ("a2u", {"rank": -1}, "`rank` must be a positive integer"),
    ("dysample", {"groups": 2.5}, "`groups` must be a positive integer"),
    ("fade", {"lite": "yes"}, "`lite` must be True or False"),
])
def test_operator_options_are_checked_when_the_operator_is_made(name, options, message):
  with pytest.raises(ValueError, match=message):
    resamplers.make_resampler(name, **options)


def test_every_operator_accepts_its_defaults():
  for name in resamplers.RESAMPLERS:
    assert resamplers.make_resampler(name).name == name


# ------------------------------------------------------------------------- train.py


@pytest.mark.parametrize("args,message", [
    (["--config.foo=1"], "--config.foo: config has no field 'foo'"),
    (["--config.batchsize=8"], "did you mean batch_size"),
    (["--config.data.optionz.root=x"], "config.data has no field 'optionz'; did you mean "
                                       "options?"),
    (["--config.batch_size=abc"], "--config.batch_size=abc"),
    (["--config", "configs/missing.py"], "--config: [Errno 2] No such file"),
    # A value the config checks refuse; the others are in
    # test_config_values_are_refused_before_training.
    (["--config.data.pipeline=numpy"], "config.data.pipeline='numpy' was removed: use 'jax' "
                                       "(same synthetic source, no TensorFlow)"),
])
def test_train_config_errors_are_one_line(args, message, tmp_path):
  if "--config" not in args:
    args = ["--config", "configs/smoke.py", *args]
  process = _cli("train.py", *args, "--workdir", str(tmp_path / "run"))
  _one_clear_line(process, message)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config_file,overrides,message", [
    ("smoke", {"num_train_steps": -5}, "config.num_train_steps must be >= 0, or -1"),
    ("resampler:carafe", {"data.source": "synthetic"},
     "data source 'synthetic' does not take background_dir, root"),
    ("smoke", {"validation.source": "nope"}, "config.validation.source must be one of"),
    ("resampler:carafe,synthetic", {"model.resampler_options.groups": 0},
     "`groups` must be a positive integer"),
])
def test_config_values_are_refused_before_training(config_file, overrides, message):
  # train.py reports these as the pipeline=numpy case above: one line, nothing written.
  name, _, argument = config_file.partition(":")
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(argument) if argument else module.get_config()
  for path, value in overrides.items():
    *parents, field = path.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[field] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    loop.validate_config(config)


def _training_folder(root: pathlib.Path, alpha_channels: int = 1) -> pathlib.Path:
  """fg/, alpha/ and bg/ for the folder source, and a config training on it (the smoke
  run's, through the JAX pipeline, with the baseline network: it compiles in half the
  time); alpha_channels=3 with differing channels: a colour alpha."""
  image, trimap = _scene(96, 112)
  alpha = trimap if alpha_channels == 1 else np.stack([trimap, trimap, 255 - trimap], -1)
  for folder, array in (("fg", image), ("alpha", alpha), ("bg", image[::-1])):
    (root / folder).mkdir(parents=True)
    Image.fromarray(array).save(root / folder / "a.png")
  config = root / "folder_config.py"
  config.write_text(textwrap.dedent(f"""
      import ml_collections
      from configs import a2u_matting, smoke

      def get_config():
        config = smoke.get_config()
        a2u_matting.use_resampler(config, "baseline")
        config.crop_size = 32
        config.data.source = "folder"
        config.data.options = ml_collections.ConfigDict(dict(root={str(root)!r}))
        config.eval_every = 0
        return config
      """))
  return config


def test_a_background_that_is_not_an_image_is_named_before_training(tmp_path):
  config = _training_folder(tmp_path / "data")
  (tmp_path / "data" / "bg" / "b.jpg").write_text("<html>not found</html>\n")
  process = _cli("train.py", "--config", str(config), "--workdir", str(tmp_path / "run"))
  _one_clear_line(process, f"{tmp_path / 'data' / 'bg' / 'b.jpg'}: not a readable image")
  assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a train.py run up to its first batch, drawn once the step compiled
def test_a_colour_alpha_stops_training_in_one_line_naming_it(tmp_path):
  """(Both executors' check, in process: test_data_pipeline.py.)"""
  config = _training_folder(tmp_path / "data", alpha_channels=3)
  process = _cli("train.py", "--config", str(config), "--workdir", str(tmp_path / "run"))
  _one_clear_line(process, f"{tmp_path / 'data' / 'alpha' / 'a.png'}: {files.COLOUR_ALPHA}")
  assert not (tmp_path / "run" / "checkpoints").exists() or not any(
      (tmp_path / "run" / "checkpoints").iterdir())


def test_train_refuses_a_workdir_that_is_a_file(tmp_path):
  workdir = tmp_path / "file"
  workdir.write_text("keep me")
  process = _cli("train.py", "--config", "configs/smoke.py", "--workdir", str(workdir))
  _one_clear_line(process, "exists and is not a folder")
  assert workdir.read_text() == "keep me"


def _signal_after(process: subprocess.Popen, metrics: pathlib.Path, rows: int,
                  number: int) -> tuple[int, str]:
  """Sends `number` once metrics.jsonl has `rows` training rows; returns (status, stderr)."""
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and process.poll() is None:
    if metrics.exists() and sum('"loss"' in line for line in
                                metrics.read_text().splitlines()) >= rows:
      process.send_signal(number)
      break
    time.sleep(0.2)
  _, err = process.communicate(timeout=240)
  return process.returncode, err


@pytest.mark.slow  # three short training runs (~2 minutes on two cores)
def test_sigint_and_sigterm_stop_after_a_step_and_every_step_is_logged_once(tmp_path):
  workdir = tmp_path / "run"
  command = [sys.executable, "train.py", "--config", "configs/smoke.py", "--workdir",
             str(workdir), "--config.num_train_steps=12", "--config.eval_every=0"]
  metrics = workdir / "metrics.jsonl"
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  for number, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
    rows_before = (sum('"loss"' in line for line in metrics.read_text().splitlines())
                   if metrics.exists() else 0)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    returncode, err = _signal_after(process, metrics, rows_before + 2, number)
    assert returncode == status, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {signal.Signals(number).name} after step ")
    assert "is saved; rerun the same command to resume" in last
    assert "done:" not in err and "Traceback" not in err
  finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
  assert finished.returncode == 0 and "done:" in finished.stdout, finished.stderr[-2000:]
  steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
           if '"loss"' in line]
  assert steps == list(range(1, 13))
