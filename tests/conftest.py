"""Test set-up: four fake CPU devices for pmap tests, and the ../shared fixtures."""

import os
import pathlib

# Must happen before JAX initialises its backends (i.e. before any test module runs).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


def _shared_file(relative: str) -> pathlib.Path:
  path = SHARED / relative
  if not path.exists():
    pytest.skip(f"needs {path} (the project's shared reference data, not shipped with "
                f"the package); place the shared/ folder beside the repository to run it")
  return path


@pytest.fixture(scope="session")
def reassembly_reference():
  """Outputs of the authors' reassembly kernels (NCHW), see shared/reference/README.md."""
  return dict(np.load(_shared_file("reference/reassembly_reference.npz")))


@pytest.fixture(scope="session")
def matting_reference():
  """The authors' matting network with randomised weights, its input, output, internals."""
  return dict(np.load(_shared_file("reference/a2u_matting_share_seed0.npz")))
