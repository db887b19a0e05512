"""The core install: what works with the core dependencies only (`pip install a2u-jax`).

The fast checks run in subprocesses of the dev environment in which only the core
install's distributions can be imported: the declared `dependencies` and theirs (resolved
from the installed metadata, as pip resolves them), the standard library, the project,
and pip and setuptools (what a new virtual environment holds). Any other installed
package (TensorFlow, OpenCV, PyTorch, and whatever only they brought in, such as
flatbuffers) is not found, as if it were not installed. The slow check installs the
package into a new virtual environment from the package index and runs the command-line
tools there.
"""

import importlib.metadata
import json
import os
import pathlib
import shlex
import shutil
import ssl
import subprocess
import sys
import textwrap
import tomllib
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Distributions of the `train` extra, and PyTorch (only the benchmarks' extra: a2u-convert
# reads .pth files without it).
OPTIONAL = ("tensorflow-cpu", "tensorflow", "tensorflow-datasets", "opencv-python-headless",
            "tensorboard", "torch")

# Run at start-up (sitecustomize): the path finder no longer finds the top-level modules
# that only distributions outside the core install provide, so importing one fails and
# importlib.util.find_spec returns None, as where they are not installed.
_CORE_ONLY = """
import importlib.abc, importlib.machinery, importlib.metadata, json, os, sys

_allowed = set(json.loads(os.environ["A2U_CORE_DISTRIBUTIONS"]))
_providers = importlib.metadata.packages_distributions()


def _installed_in_core(name):
  providers = {d.lower().replace("_", "-").replace(".", "-") for d in _providers.get(name, ())}
  return not providers or bool(providers & _allowed) or name in sys.stdlib_module_names


class _CoreOnly(importlib.abc.MetaPathFinder):
  def find_spec(self, fullname, path=None, target=None):
    if path is None and not _installed_in_core(fullname):
      return None
    return importlib.machinery.PathFinder.find_spec(fullname, path, target)

  def invalidate_caches(self):
    importlib.machinery.PathFinder.invalidate_caches()


sys.meta_path[:] = [_CoreOnly() if finder is importlib.machinery.PathFinder else finder
                    for finder in sys.meta_path]
"""


def core_distributions() -> set[str]:
  """Canonical names of the distributions a core install holds: pyproject.toml's
  `dependencies` and, recursively, theirs (with the extras they ask for and the markers
  of this interpreter), read from the installed metadata; plus the project, pip and
  setuptools."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  names = {canonicalize_name(project["name"]), "pip", "setuptools"}
  pending = [(Requirement(line), "") for line in project["dependencies"]]
  seen: set[tuple[str, str]] = set()
  while pending:
    requirement, extra = pending.pop()
    if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
      continue
    name = canonicalize_name(requirement.name)
    names.add(name)
    for wanted in {"", *requirement.extras}:
      if (name, wanted) not in seen:
        seen.add((name, wanted))
        requires = importlib.metadata.distribution(name).requires or []
        pending += [(Requirement(line), wanted) for line in requires]
  return names


@pytest.fixture(scope="module")
def without_tensorflow(tmp_path_factory) -> dict[str, str]:
  """An environment in which only the core install's distributions can be imported."""
  startup = tmp_path_factory.mktemp("core_only")
  (startup / "sitecustomize.py").write_text(_CORE_ONLY)
  return dict(os.environ, PYTHONPATH=os.pathsep.join([str(startup), str(ROOT)]),
              A2U_CORE_DISTRIBUTIONS=json.dumps(sorted(core_distributions())),
              JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _python(env, code: str, *args, timeout=600, cwd=None) -> subprocess.CompletedProcess:
  process = subprocess.run([sys.executable, *(["-c", textwrap.dedent(code)] if code else []),
                            *args], env=env, cwd=cwd or ROOT, capture_output=True, text=True,
                           timeout=timeout)
  assert process.returncode == 0, process.stderr[-4000:]
  return process


def test_only_the_core_distributions_import(without_tensorflow):
  core = core_distributions()
  assert {"jax", "jaxlib", "flax", "orbax-checkpoint", "grain", "flatbuffers"} <= core
  assert not core & set(OPTIONAL)
  # flatbuffers is installed here because TensorFlow requires it: the core install must
  # declare it itself (jax.export's serialization needs it).
  out = _python(without_tensorflow, """
      import importlib, json
      errors = {}
      for name in ("tensorflow", "cv2", "tensorboard", "flatbuffers", "orbax.checkpoint",
                   "grain"):
        try:
          importlib.import_module(name)
        except ImportError as error:
          errors[name] = str(error)
      print(json.dumps(errors))
      """)
  errors = json.loads(out.stdout.strip().splitlines()[-1])
  assert errors == {name: f"No module named '{name}'"
                    for name in ("tensorflow", "cv2", "tensorboard")}, errors


def test_core_modules_import_and_run_without_tensorflow(without_tensorflow):
  out = _python(without_tensorflow, """
      import json, sys
      import jax, jax.numpy as jnp, numpy as np
      from a2u_jax import (checkpointing, convert, evaluate, export, inputs, layers, losses,
                           metrics, models, ops, predict, pth, resamplers)
      from a2u_jax.training import loop, state, steps
      import data_pipeline
      from data_pipeline import evaluation, jax_pipeline, trimaps

      x = jnp.ones((1, 16, 16, 32))
      down = layers.A2UDownsample()
      y, kernels = jax.jit(down.apply)(jax.jit(down.init)(jax.random.key(0), x), x)
      z = jax.jit(layers.A2UUpsample().apply)({}, y, kernels)
      items = data_pipeline.synthetic_items(count=1, min_size=32, max_size=40)
      batch = next(jax_pipeline.JaxStream(jax_pipeline.host_source(
          "synthetic", num_foregrounds=2, num_backgrounds=2, min_size=40, max_size=48),
          batch_size=2, crop_size=32).batches())
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


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
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
  assert "--config.data.pipeline=jax" in process.stderr
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


def _pip_settings() -> dict[str, str]:
  """pip's configuration (`pip config list`: its files and PIP_* variables), by option
  name; a variable wins over the files, as in pip."""
  listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                          text=True, check=True).stdout
  settings: dict[str, str] = {}
  for line in sorted(listed.splitlines(), key=lambda line: line.startswith(":env:")):
    key, _, value = line.partition("=")
    settings[key.split(".", 1)[-1]] = value.strip().strip("'\"")
  return settings


def _reachable(url: str, cafile: str | None) -> bool:
  """Whether the package index at `url` answers (any HTTP status), or is a folder."""
  parsed = urllib.parse.urlparse(url)
  if parsed.scheme not in ("http", "https"):  # file: or a path
    return pathlib.Path(urllib.request.url2pathname(parsed.path)).is_dir()
  try:
    urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=20,
                           context=ssl.create_default_context(cafile=cafile))
  except urllib.error.HTTPError:
    return True
  except (urllib.error.URLError, OSError):
    return False
  return True


def _skip_unless_an_index_is_reachable() -> None:
  """Skips, naming them, when none of pip's package indexes can be reached."""
  settings = _pip_settings()
  if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
    return  # find-links only: nothing to reach
  indexes = [settings.get("index-url", "https://pypi.org/simple"),
             *settings.get("extra-index-url", "").split()]
  if not any(_reachable(url, settings.get("cert")) for url in indexes):
    pytest.skip(f"no package index can be reached to install the core dependencies "
                f"(pip is configured with {', '.join(indexes)})")


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
  process = subprocess.run(command, capture_output=True, text=True, **kwargs)
  assert process.returncode == 0, f"{shlex.join(command)}: {process.stderr[-3000:]}"
  return process


@pytest.mark.slow  # installs the core dependencies into a new virtual environment (minutes)
def test_a_fresh_core_virtualenv_runs_the_operator_export_and_predict(tmp_path):
  """`pip install a2u-jax` (no extras) into a new virtual environment, from pip's package
  index, then the operator, a2u-predict, a2u-export and a2u-predict --exported there."""
  import jax
  import jax.numpy as jnp

  from a2u_jax import checkpointing, models

  _skip_unless_an_index_is_reachable()
  options = {"resampler": "a2u", "resampler_options": {"share": True}}
  model = models.build_model(options)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 4)))
  checkpoint = checkpointing.save_model_checkpoint(tmp_path / "model", variables, options)
  # A copy of the sources, so that building the package writes nothing into the repository.
  source = tmp_path / "source"
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source / name)
  for name in ("a2u_jax", "data_pipeline", "configs"):
    shutil.copytree(ROOT / name, source / name,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", str(venv)])  # without the system's site-packages
  python, scripts = str(venv / "bin" / "python"), venv / "bin"
  _run([python, "-m", "pip", "install", "--quiet", str(source)], timeout=1800)
  listed = _run([python, "-m", "pip", "list", "--format=json"]).stdout
  installed = {canonicalize_name(p["name"]) for p in json.loads(listed)}
  assert "flatbuffers" in installed
  assert not installed & set(OPTIONAL), installed & set(OPTIONAL)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH="")
  snippet = """
      import jax, jax.numpy as jnp
      from a2u_jax import layers, ops
      x = jnp.ones((2, 16, 16, 32))
      down = layers.A2UDownsample()
      y, up_kernels = down.apply(down.init(jax.random.key(0), x), x)
      z = layers.A2UUpsample().apply({}, y, up_kernels)
      assert z.shape == x.shape, z.shape
      """
  _run([python, "-c", textwrap.dedent(snippet)], env=env, cwd=tmp_path)
  _write_pair(tmp_path / "photos", "dog")
  pair = ["--image", str(tmp_path / "photos" / "image" / "dog.png"),
          "--trimap", str(tmp_path / "photos" / "trimap" / "dog.png")]
  _run([str(scripts / "a2u-predict"), "--checkpoint", str(checkpoint), *pair, "--out",
        str(tmp_path / "out")], env=env, cwd=tmp_path, timeout=600)
  artifact = tmp_path / "serving" / "a2u.jaxexport"
  _run([str(scripts / "a2u-export"), "--checkpoint", str(checkpoint), "--out", str(artifact),
        "--platforms", "cpu"], env=env, cwd=tmp_path, timeout=600)
  _run([str(scripts / "a2u-predict"), "--exported", str(artifact), *pair, "--out",
        str(tmp_path / "exported")], env=env, cwd=tmp_path, timeout=600)
  through_checkpoint, through_artifact = (
      np.asarray(Image.open(tmp_path / out / "dog_alpha.png")).astype(int)
      for out in ("out", "exported"))
  assert through_checkpoint.shape == (40, 36)
  assert (through_artifact[:8] == 0).all() and (through_artifact[-8:] == 255).all()
  assert np.abs(through_artifact - through_checkpoint).max() <= 1
