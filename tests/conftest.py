"""Test set-up: four fake CPU devices for pmap tests, fast compiles, and the ../shared
fixtures."""

import atexit
import importlib.metadata
import json
import os
import pathlib
import shutil
import tempfile

# Must happen before JAX initialises its backends (i.e. before any test module runs).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
# XLA:CPU's older loop emitters compile the suite's programs faster than its MLIR fusion
# emitters: make test took 252 s instead of 311 s on 2 cores, and every default test passes
# either way (XLA_FLAGS=--xla_cpu_use_fusion_emitters=true runs them with the default). XLA
# aborts on a flag it does not know, so it is set only for the jaxlib it was checked with.
if (importlib.metadata.version("jaxlib").startswith("0.10.")
    and "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]):
  os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
# Compiling, not running, is most of the suite's time (the full network's training step
# alone takes ~20 s to compile with every optimisation): skip XLA's optimisation passes, in
# this process and in the CLIs it starts (about 15% off the default run). The numbers do
# not depend on it: the equivalence tests hold with and without (JAX_DISABLE_MOST_
# OPTIMIZATIONS=0 runs them optimised).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Many tests, and the CLIs they start, compile the same programs (the smoke network's
# training step above all): a persistent compilation cache private to this test process
# and its children turns the repeats into cache reads.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="a2u-jax-test-cache-")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
# The authors' reference outputs that ship with the tests (see its README).
REFERENCE = pathlib.Path(__file__).resolve().parent / "data" / "reference"


def _shared_file(relative: str) -> pathlib.Path:
  path = SHARED / relative
  if not path.exists():
    pytest.skip(f"needs {path} (the project's shared reference data, not shipped with "
                f"the package); place the shared/ folder beside the repository to run it")
  return path


@pytest.fixture(scope="session")
def reassembly_reference():
  """Outputs of the authors' reassembly kernels (NCHW), see data/reference/README.md."""
  return dict(np.load(REFERENCE / "reassembly_reference.npz"))


def official_keys(share: str) -> dict[str, list[int]]:
  """The official checkpoint's keys and shapes ("share" or "unshare")."""
  return json.loads((REFERENCE / f"official_checkpoint_keys_{share}.json").read_text())


def rule0_state_dict(share: str) -> dict[str, np.ndarray]:
  """The "rule 0" weights of the reference files, rebuilt from their rule."""
  rng = np.random.default_rng(0)
  state = {}
  for key, shape in sorted(official_keys(share).items()):
    if key.endswith("num_batches_tracked"):
      state[key] = np.zeros(shape, np.int64)
    elif key.endswith("running_var"):
      state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif len(shape) == 4:
      state[key] = (rng.standard_normal(shape) *
                    np.sqrt(1 / (shape[1] * shape[2] * shape[3]))).astype(np.float32)
    else:
      state[key] = (rng.standard_normal(shape) * 0.5).astype(np.float32)
  return state


@pytest.fixture(scope="session")
def matting_reference():
  """The authors' matting network with randomised weights, its input, output, internals."""
  return dict(np.load(_shared_file("reference/a2u_matting_share_seed0.npz")))


def random_torch_state_dict(share: str, seed: int = 0) -> dict[str, np.ndarray]:
  """Random values for every key of the authors' checkpoint ("share" or "unshare"), named
  and shaped as their PyTorch code holds them (module.-prefixed)."""
  keys = official_keys(share)
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in keys.items():
    if key.endswith("num_batches_tracked"):
      state[f"module.{key}"] = np.array(7, np.int64)
    elif key.endswith("running_var"):
      state[f"module.{key}"] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      state[f"module.{key}"] = (0.1 * rng.normal(size=shape)).astype(np.float32)
  return state


@pytest.fixture(scope="session")
def converted_checkpoint(tmp_path_factory) -> pathlib.Path:
  """A model checkpoint made by the converter CLI from a random authors'-format state dict."""
  from a2u_jax import convert

  folder = tmp_path_factory.mktemp("converted")
  source = folder / "random_share.npz"
  np.savez(source, **{f"state_dict/{k}": v for k, v in random_torch_state_dict("share").items()})
  convert.main(["--torch", str(source), "--out", str(folder / "model")])
  return folder / "model"
