"""Matting metrics against hand-worked cases, a loop transcription of the authors' MATLAB
scripts (tests/matlab_transcription.py) and values written down for real photographs."""

import math

import numpy as np
import pytest
from PIL import Image

from a2u_jax import metrics
from tests import matlab_transcription as matlab
from tests.conftest import SHARED

ALL_UNKNOWN = np.full((1, 1), 128, np.uint8)


def _unknown(shape):
  return np.full(shape, 128, np.uint8)


def test_sad_and_mse_by_hand():
  pred = np.array([[0, 255], [128, 128]], np.uint8)
  gt = np.zeros((2, 2), np.uint8)
  trimap = np.array([[128, 128], [128, 0]], np.uint8)  # the last pixel is known: ignored
  assert metrics.sad(pred, gt, trimap) == pytest.approx((255 + 128) / 255 / 1000, rel=1e-7)
  assert metrics.mse(pred, gt, trimap) == pytest.approx((1 + (128 / 255) ** 2) / 3, rel=1e-7)
  # Floats in 0..255 are the same alphas.
  assert metrics.sad(pred.astype(np.float64), gt, trimap) == metrics.sad(pred, gt, trimap)


def test_gaussian_derivative_kernel_is_gaussgradient_m():
  smooth, derivative = metrics.gaussian_derivative_kernels(1.4)
  hx = np.outer(smooth, derivative)
  assert hx.shape == (9, 9)  # half-size ceil(1.4 * sqrt(-2 ln(sqrt(2 pi) 1.4 0.01))) = 4
  assert np.sum(hx ** 2) == pytest.approx(1.0, rel=1e-12)
  np.testing.assert_allclose(hx, -hx[:, ::-1], atol=0)  # odd along x, the derivative axis
  gauss = lambda x: math.exp(-x ** 2 / (2 * 1.4 ** 2)) / (1.4 * math.sqrt(2 * math.pi))
  unnormalised = gauss(1) * (-(-3) * gauss(-3) / 1.4 ** 2)  # hx(i=6, j=2) in MATLAB indices
  scale = hx[5, 1] / unnormalised
  assert scale > 0
  np.testing.assert_allclose(hx[3, 7] / scale, gauss(-1) * (-3 * gauss(3) / 1.4 ** 2))


def test_grad_uses_mat2gray():
  # pred is gt at half the contrast: after mat2gray both are the same image, so Grad is 0,
  # while their raw gradients differ by a factor of two.
  rng = np.random.default_rng(0)
  gt = (rng.integers(0, 101, (24, 24)) * 2).astype(np.uint8)
  pred = gt // 2
  trimap = _unknown(gt.shape)
  assert metrics.grad(pred, gt, trimap) < 1e-12
  raw = [np.hypot(*metrics.gaussian_gradient(a / 255.0)) for a in (pred, gt)]
  assert np.sum((raw[0] - raw[1]) ** 2) / 1000 > 1e-3
  np.testing.assert_allclose(metrics.mat2gray(pred), metrics.mat2gray(gt), atol=1e-15)


def test_mat2gray_of_a_constant_image():
  np.testing.assert_array_equal(metrics.mat2gray(np.full((2, 2), 7)), np.ones((2, 2)))
  np.testing.assert_array_equal(metrics.mat2gray(np.zeros((2, 2))), np.zeros((2, 2)))


def test_grad_of_a_step_edge_by_hand():
  # A vertical 0 -> 255 step: only gx is nonzero and, away from the top and bottom rows,
  # each pixel sees the sum of the kernel column weights left of the edge.
  gt = np.zeros((12, 12), np.uint8)
  gt[:, 6:] = 255
  pred = np.zeros_like(gt)
  trimap = np.zeros_like(gt)
  trimap[6, 5] = 128  # one pixel, just left of the edge
  smooth, derivative = metrics.gaussian_derivative_kernels()
  # Convolution: gx(x=5) = sum over taps u of derivative[u] * image(5 - u + 4 offset).
  taps = np.arange(-4, 5)
  gx = sum(derivative[u + 4] for u in taps if 5 - u >= 6) * smooth.sum()
  assert metrics.grad(pred, gt, trimap) == pytest.approx(np.float32(abs(gx)) ** 2 / 1000,
                                                         rel=1e-6)


def test_conn_thresholds_split_a_component():
  # gt is 1 everywhere; pred dips to 60/255 at one pixel. At t = 0.1 and 0.2 the row is one
  # component; from t = 0.3 the dip splits it and the right part (3 pixels) is the larger,
  # so pixels 0-2 stop at level 0.2. phi(gt) = 0.2 there; phi(pred) = 0.2 at pixels 0-1 and
  # 1 at the dip (60/255 - 0.2 < 0.15). Only the dip differs, by 0.8.
  pred = np.array([[255, 255, 60, 255, 255, 255]], np.uint8)
  gt = np.full_like(pred, 255)
  trimap = _unknown(pred.shape)
  assert metrics.conn(pred, gt, trimap) == pytest.approx(0.8 / 1000, rel=1e-6)
  levels = metrics.connectivity_levels(pred / np.float32(255), gt / np.float32(255))
  np.testing.assert_allclose(levels, [[0.2, 0.2, 0.2, 1, 1, 1]])


def test_conn_breaks_ties_in_column_major_order():
  # Two single-pixel components of equal size: A at (row 0, col 2) and B at (row 2, col 0).
  # MATLAB's bwconncomp lists B first (column-major), so B is "largest" from t = 0.1 and A
  # gets level 0: |phi_p - phi_g| = |(1 - 200/255) - 0| = 55/255. Row-major order would keep
  # A until t = 0.8 and give 0.3.
  pred = np.zeros((3, 3), np.uint8)
  gt = np.zeros((3, 3), np.uint8)
  pred[0, 2], gt[0, 2] = 200, 255
  pred[2, 0] = gt[2, 0] = 255
  assert metrics.conn(pred, gt, _unknown((3, 3))) == pytest.approx(55 / 255 / 1000, rel=1e-6)
  assert metrics.conn(pred.T, gt.T, _unknown((3, 3))) == pytest.approx(0.3 / 1000, rel=1e-6)


def test_conn_keeps_matlabs_continue_when_no_component_is_left():
  # From t = 0.4 nothing is left (pred = 100/255), the MATLAB loop skips those thresholds,
  # and the pixel ends at level 1, not 0.3: both phi are 1.
  assert metrics.conn(np.array([[100]]), np.array([[255]]), ALL_UNKNOWN) == 0.0


def test_conn_thresholds_are_inclusive_and_matlab_colon():
  thresholds = metrics.matlab_colon(0, 0.1, 1)
  assert len(thresholds) == 11 and thresholds[-1] == 1.0
  assert thresholds[6] == 0.6 and np.arange(0, 1.1, 0.1)[6] != 0.6
  # 153/255 is exactly 0.6; in single precision it is above the threshold, as in MATLAB,
  # so the pixel leaves the component (kept alive by its 255 neighbour) only at t = 0.7.
  levels = metrics.connectivity_levels(np.array([[153, 255]], np.float32) / np.float32(255),
                                       np.ones((1, 2), np.float32))
  np.testing.assert_array_equal(levels, [[thresholds[6], 1.0]])


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_the_matlab_transcription_on_random_mattes(seed):
  rng = np.random.default_rng(seed)
  height, width = rng.integers(1, 24, 2)
  values = [np.arange(0, 256, 51), np.array([0, 255]), np.arange(256)][seed % 3]
  pred, gt = (rng.choice(values, (height, width)).astype(np.uint8) for _ in range(2))
  trimap = rng.choice(np.array([0, 128, 255], np.uint8), (height, width), p=[.2, .6, .2])
  trimap[0, 0] = 128
  for ours, theirs in ((metrics.sad, matlab.compute_sad_loss),
                       (metrics.mse, matlab.compute_mse_loss),
                       (metrics.grad, matlab.compute_gradient_loss),
                       (metrics.conn, matlab.compute_connectivity_error)):
    assert ours(pred, gt, trimap) == pytest.approx(theirs(pred, gt, trimap), rel=1e-9,
                                                   abs=1e-15)


# Written down on 2026-11-26 from tests/matlab_transcription.py (loops, BFS components, full
# 2-D kernel; no SciPy) on trimap_XX of ../shared/data/alphamatting_lowres, with pred =
# _degraded(alpha_XX): (SAD, MSE, Grad, Conn).
REAL_PHOTO_VALUES = {
    "01": (5.809353049910162, 0.09454685447850085, 30.349632074397736, 5.437780407607556),
    "02": (7.966988393895328, 0.0840601642906648, 37.815363888890055, 7.454605894982815),
    "03": (10.567870865635108, 0.02317758696220461, 10.667840628572673, 9.221415751039983),
    "04": (21.86904369707685, 0.04178462319419394, 32.643707507187955, 21.762974816739558),
    "05": (4.355415772502776, 0.08934649200509825, 22.000982186729807, 4.083341186881065),
    "06": (6.372419770751614, 0.04868513076100891, 18.94075896507035, 5.890339254617691),
    "07": (6.0390785783506, 0.05023108582288046, 19.36232227810734, 5.61194710111618),
    "08": (13.146314084547106, 0.021675929028551113, 12.20515432867934, 12.55571395111084),
    "09": (8.004513949710411, 0.022807989106917326, 9.869356165247932, 7.2414961796402935),
    "10": (6.770400170369539, 0.06041844432803561, 20.960319162360904, 6.4353392510414125),
    "11": (10.917972803118639, 0.09779511029693591, 31.712899340479844, 10.785235358178616),
    "12": (4.025905994097702, 0.04581354046292789, 9.592232375799382, 3.80284513092041),
    "13": (27.45637699079141, 0.12193943784176146, 116.75770400226754, 26.74381968218088),
}


def _degraded(gt: np.ndarray) -> np.ndarray:
  """A deterministic imperfect prediction: gt shifted by (3, -2) px plus a +-20 pattern."""
  yy, xx = np.mgrid[:gt.shape[0], :gt.shape[1]]
  shifted = np.roll(gt, (3, -2), axis=(0, 1)).astype(np.int32)
  return np.clip(shifted + (yy * 7 + xx * 13) % 41 - 20, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("number", sorted(REAL_PHOTO_VALUES))
def test_real_photographs_match_written_down_values(number):
  root = SHARED / "data" / "alphamatting_lowres"
  if not root.is_dir():
    pytest.skip(f"needs {root} (shared real photographs, not shipped with the package)")
  gt = np.asarray(Image.open(root / f"alpha_{number}.png").convert("L"))
  trimap = np.asarray(Image.open(root / f"trimap_{number}.png").convert("L"))
  pred = _degraded(gt)
  ours = (metrics.sad(pred, gt, trimap), metrics.mse(pred, gt, trimap),
          metrics.grad(pred, gt, trimap), metrics.conn(pred, gt, trimap))
  np.testing.assert_allclose(ours, REAL_PHOTO_VALUES[number], rtol=1e-9)
  assert metrics.all_metrics(gt, gt, trimap) == {"sad": 0.0, "mse": 0.0, "grad": 0.0,
                                                 "conn": 0.0}


def test_no_unknown_pixel_gives_zero_sums_and_nan_mse():
  trimap = np.zeros((4, 4), np.uint8)
  pred, gt = np.full((4, 4), 255, np.uint8), np.zeros((4, 4), np.uint8)
  values = metrics.all_metrics(pred, gt, trimap)
  assert values["sad"] == values["grad"] == values["conn"] == 0.0
  assert math.isnan(values["mse"])


@pytest.mark.parametrize("pred,gt,trimap,message", [
    (np.zeros((4, 4)), np.zeros((4, 5)), np.zeros((4, 4)), "same \\(H, W\\) shape"),
    (np.zeros((4, 4, 3)), np.zeros((4, 4)), np.zeros((4, 4)), "pred: expected an \\(H, W\\)"),
    (np.full((4, 4), 0.5), np.zeros((4, 4)), np.zeros((4, 4)), "pred: .* look like a \\[0, 1\\]"),
    (np.zeros((4, 4)), np.full((4, 4), 1.0), np.zeros((4, 4)), "gt: .* look like a \\[0, 1\\]"),
    (np.full((4, 4), 256.0), np.zeros((4, 4)), np.zeros((4, 4)), "pred: values must be 8-bit"),
    (np.full((4, 4), -1), np.zeros((4, 4)), np.zeros((4, 4)), "pred: values must be 8-bit"),
    (np.full((4, 4), np.nan), np.zeros((4, 4)), np.zeros((4, 4)), "pred: contains nan"),
    (np.zeros((4, 4), bool), np.zeros((4, 4)), np.zeros((4, 4)), "pred: expected uint8 or float"),
])
def test_bad_inputs_are_refused(pred, gt, trimap, message):
  for metric in metrics.METRICS.values():
    with pytest.raises(ValueError, match=message):
      metric(pred, gt, trimap)


def test_trailing_channel_axis_is_accepted():
  rng = np.random.default_rng(1)
  pred, gt = (rng.integers(0, 256, (8, 8)).astype(np.uint8) for _ in range(2))
  trimap = _unknown((8, 8))
  assert (metrics.all_metrics(pred[..., None], gt[..., None], trimap[..., None])
          == metrics.all_metrics(pred, gt, trimap))
