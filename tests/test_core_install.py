"""The core install: what works without TensorFlow, TFDS, OpenCV, TensorBoard and PyTorch.

Each check runs in a subprocess whose PYTHONPATH starts with stand-in packages for those
five that raise ImportError, as if they were not installed.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_EXTRA = ("tensorflow", "tensorflow_datasets", "cv2", "tensorboard")
# PyTorch is only the benchmarks' extra: a2u-convert reads .pth files without it.
OPTIONAL = TRAIN_EXTRA + ("torch",)


@pytest.fixture(scope="module")
def without_tensorflow(tmp_path_factory) -> dict[str, str]:
  """An environment in which the `train` extra's packages and PyTorch cannot be imported."""
  blocked = tmp_path_factory.mktemp("blocked")
  for name in OPTIONAL:
    (blocked / name).mkdir()
    (blocked / name / "__init__.py").write_text(
        f"raise ImportError('{name} is blocked: this test runs the core install')\n")
  return dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocked), str(ROOT)]),
              JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _python(env, code: str, *args, timeout=600, cwd=None) -> subprocess.CompletedProcess:
  process = subprocess.run([sys.executable, *(["-c", textwrap.dedent(code)] if code else []),
                            *args], env=env, cwd=cwd or ROOT, capture_output=True, text=True,
                           timeout=timeout)
  assert process.returncode == 0, process.stderr[-4000:]
  return process


def test_the_stand_ins_really_block(without_tensorflow):
  for name in ("tensorflow", "torch"):
    process = subprocess.run([sys.executable, "-c", f"import {name}"],
                             env=without_tensorflow, capture_output=True, text=True)
    assert process.returncode != 0 and "blocked" in process.stderr


def test_core_modules_import_and_run_without_tensorflow(without_tensorflow):
  out = _python(without_tensorflow, """
      import json, sys
      import jax, jax.numpy as jnp, numpy as np
      from a2u_jax import (checkpointing, convert, evaluate, export, inputs, layers, losses,
                           metrics, models, ops, predict, pth, resamplers)
      from a2u_jax.training import loop, state, steps
      import data_pipeline
      from data_pipeline import evaluation, synthetic_stream, trimaps

      x = jnp.ones((1, 16, 16, 32))
      down = layers.A2UDownsample()
      y, kernels = down.apply(down.init(jax.random.key(0), x), x)
      z = layers.A2UUpsample().apply({}, y, kernels)
      items = data_pipeline.synthetic_items(count=1, min_size=32, max_size=40)
      batch = next(data_pipeline.SyntheticStream(
          num_foregrounds=2, num_backgrounds=2, min_size=40, max_size=48).batches(
              batch_size=2, crop_size=32))
      errors = {}
      for what, call in (
          ("build_source", lambda: data_pipeline.build_source("adobe", root="x")),
          ("train_batches", lambda: data_pipeline.train_batches),
          ("tfds_items", lambda: data_pipeline.tfds_items("composition1k", "x"))):
        try:
          call()
        except ImportError as error:
          errors[what] = str(error)
      print(json.dumps({
          "loaded": sorted(m for m in sys.modules
                           if m.split(".")[0] in ("tensorflow", "tensorflow_datasets",
                                                  "cv2", "tensorboard", "torch")),
          "shapes": [list(y.shape), list(kernels.shape), list(z.shape)],
          "items": len(items), "batch": {k: list(v.shape) for k, v in batch.items()},
          "errors": errors}))
      """)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["loaded"] == []
  assert result["shapes"] == [[1, 8, 8, 32], [1, 16, 16, 9], [1, 16, 16, 32]]
  assert result["items"] == 1
  assert result["batch"]["image"] == [2, 32, 32, 3]
  assert set(result["errors"]) == {"build_source", "train_batches", "tfds_items"}
  for message in result["errors"].values():
    assert "pip install 'a2u-jax[train]'" in message


def test_convert_a_pth_export_and_predict_without_torch_or_tensorflow(without_tensorflow,
                                                                       tmp_path):
  from tests import pth_writer
  from tests.conftest import random_torch_state_dict

  # The authors' release format: PyTorch 1.3.1 wrote the legacy format.
  source = pth_writer.write_pth(tmp_path / "model_best.pth", random_torch_state_dict("share"),
                                legacy=True)
  convert = _python(without_tensorflow, None, "-m", "a2u_jax.convert", "--torch", str(source),
                    "--out", str(tmp_path / "model"))
  assert "share A2U matting network" in convert.stdout
  artifact = tmp_path / "serving" / "a2u.jaxexport"
  _python(without_tensorflow, None, "-m", "a2u_jax.export", "--checkpoint",
          str(tmp_path / "model"), "--out", str(artifact), "--platforms", "cpu")
  assert json.loads((tmp_path / "serving" / "a2u.jaxexport.json").read_text())["platforms"] == [
      "cpu"]
  _write_pair(tmp_path / "photos", "cat")
  _python(without_tensorflow, None, "-m", "a2u_jax.predict", "--exported", str(artifact),
          "--image", str(tmp_path / "photos" / "image" / "cat.png"), "--trimap",
          str(tmp_path / "photos" / "trimap" / "cat.png"), "--out", str(tmp_path / "out"))
  alpha = np.asarray(Image.open(tmp_path / "out" / "cat_alpha.png"))
  assert alpha.shape == (40, 36) and (alpha[-8:] == 255).all()


def test_real_sources_through_tf_say_they_need_the_extra(without_tensorflow, tmp_path):
  process = subprocess.run(
      [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "smoke.py"),
       "--workdir", str(tmp_path / "run"), "--config.data.pipeline=tf"],
      env=without_tensorflow, capture_output=True, text=True, timeout=300)
  assert process.returncode != 0
  assert "pip install 'a2u-jax[train]'" in process.stderr
  assert "--config.data.pipeline=numpy" in process.stderr
  assert not (tmp_path / "run").exists()


def _write_pair(folder: pathlib.Path, name: str, size=(40, 36)):
  rng = np.random.default_rng(0)
  (folder / "image").mkdir(parents=True, exist_ok=True)
  (folder / "trimap").mkdir(parents=True, exist_ok=True)
  Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(
      folder / "image" / f"{name}.png")
  trimap = np.full(size, 128, np.uint8)
  trimap[:8] = 0
  trimap[-8:] = 255
  Image.fromarray(trimap).save(folder / "trimap" / f"{name}.png")


@pytest.mark.slow  # compiles the A2U training step and inference (~3 min on two cores)
def test_smoke_training_predict_and_evaluate_without_tensorflow(without_tensorflow, tmp_path):
  workdir = tmp_path / "run"
  train = _python(without_tensorflow, None, str(ROOT / "train.py"), "--config",
                  str(ROOT / "configs" / "smoke.py"), "--workdir", str(workdir),
                  "--config.crop_size=32", "--config.num_train_steps=2",
                  "--config.checkpoint_every=1", "--config.eval_every=2",
                  "--config.image_summary_every=0", "--config.validation.options.count=1",
                  "--config.validation.options.min_size=32",
                  "--config.validation.options.max_size=40")
  assert "TensorBoard summaries skipped" in train.stderr
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [1, 2]
  assert any("validation/sad" in r for r in records)
  assert (workdir / "model" / "model.json").exists()
  assert not (workdir / "tensorboard").exists()

  _write_pair(tmp_path / "photos", "cat")
  _python(without_tensorflow, None, "-m", "a2u_jax.predict", "--checkpoint",
          str(workdir / "model"), "--image", str(tmp_path / "photos" / "image"), "--trimap",
          str(tmp_path / "photos" / "trimap"), "--out", str(tmp_path / "predictions"))
  alpha = np.asarray(Image.open(tmp_path / "predictions" / "cat_alpha.png"))
  assert alpha.shape == (40, 36)
  assert (alpha[:8] == 0).all() and (alpha[-8:] == 255).all()

  _python(without_tensorflow, None, "-m", "a2u_jax.evaluate", "--checkpoint",
          str(workdir / "model"), "--data", "synthetic", "--count", "2", "--out",
          str(tmp_path / "evaluation"), "--no-progress")
  assert len((tmp_path / "evaluation" / "metrics.csv").read_text().splitlines()) == 3


@pytest.mark.slow  # installs the core dependencies into a new virtual environment
def test_a_fresh_core_virtualenv_runs_the_operator_and_predict(tmp_path):
  import jax
  import jax.numpy as jnp

  from a2u_jax import checkpointing, models

  options = {"resampler": "a2u", "resampler_options": {"share": True}}
  model = models.build_model(options)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 4)))
  checkpoint = checkpointing.save_model_checkpoint(tmp_path / "model", variables, options)
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  install = subprocess.run([python, "-m", "pip", "install", "--quiet", str(ROOT)],
                           capture_output=True, text=True, timeout=1200)
  assert install.returncode == 0, install.stderr[-3000:]
  listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True,
                          text=True, check=True).stdout
  installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed)}
  assert not installed & {"tensorflow", "tensorflow-cpu", "tensorflow-datasets",
                          "opencv-python-headless", "tensorboard"}
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH="")
  snippet = """
      import jax, jax.numpy as jnp
      from a2u_jax import layers, ops
      x = jnp.ones((2, 16, 16, 32))
      down = layers.A2UDownsample()
      y, up_kernels = down.apply(down.init(jax.random.key(0), x), x)
      z = layers.A2UUpsample().apply({}, y, up_kernels)
      assert z.shape == x.shape, z.shape
      print("operator ok")
      """
  _write_pair(tmp_path / "photos", "dog")
  subprocess.run([python, "-c", textwrap.dedent(snippet)], env=env, cwd=tmp_path, check=True)
  predict = subprocess.run(
      [python, "-m", "a2u_jax.predict", "--checkpoint", str(checkpoint), "--image",
       str(tmp_path / "photos" / "image" / "dog.png"), "--trimap",
       str(tmp_path / "photos" / "trimap" / "dog.png"), "--out", str(tmp_path / "out")],
      env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert predict.returncode == 0, predict.stderr[-3000:]
  assert (tmp_path / "out" / "dog_alpha.png").exists()
