"""The operator demo (A2U down/up reconstruction) runs end to end and writes its picture."""

import numpy as np
import pytest
from PIL import Image

from a2u_jax import reconstruction_demo as demo


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_demo_writes_the_comparison_picture(tmp_path):
  scores = demo.run(tmp_path, size=16, steps=3)
  picture = np.asarray(Image.open(tmp_path / "a2u_demo.png"))
  assert picture.shape == (16, 4 * 16, 3)
  assert picture.std() > 0
  assert set(scores) == {"bilinear_psnr", "a2u_psnr"}
  assert all(np.isfinite(v) for v in scores.values())
  assert [p.name for p in tmp_path.iterdir()] == ["a2u_demo.png"]  # no temp files left


def test_demo_rejects_a_bad_size(tmp_path):
  with pytest.raises(SystemExit):
    demo.main(["--out", str(tmp_path), "--size", "10"])
  assert not (tmp_path / "a2u_demo.png").exists()


def test_synthetic_image_is_deterministic():
  np.testing.assert_array_equal(demo.synthetic_image(32, 1), demo.synthetic_image(32, 1))
  assert not np.array_equal(demo.synthetic_image(32, 1), demo.synthetic_image(32, 2))
