"""The NumPy synthetic training stream and the SciPy trimap erosion (no TensorFlow)."""

import numpy as np
import pytest

from data_pipeline import protocol, synthetic_stream, trimaps

CROP = 32
OPTIONS = dict(num_foregrounds=3, num_backgrounds=2, min_size=24, max_size=56, seed=0,
               backgrounds_per_foreground=2)


def _erode_loop(mask, footprint):
  """Erosion by its definition, OpenCV's anchor (size // 2) and border (no erosion)."""
  size = footprint.shape[0]
  anchor = size // 2
  height, width = mask.shape
  out = np.zeros_like(mask)
  for y in range(height):
    for x in range(width):
      values = [mask[y + i - anchor, x + j - anchor]
                for i in range(size) for j in range(size) if footprint[i, j]
                and 0 <= y + i - anchor < height and 0 <= x + j - anchor < width]
      out[y, x] = min(values, default=1)
  return out


def test_numpy_erosion_matches_its_definition_for_odd_and_even_sizes():
  rng = np.random.default_rng(0)
  mask = (rng.random((23, 31)) > 0.08).astype(np.uint8)
  for size in (1, 2, 3, 4, 7, 10, 29):
    np.testing.assert_array_equal(trimaps.erode(mask, size),
                                  _erode_loop(mask, trimaps.ellipse_footprint(size)),
                                  err_msg=str(size))


def test_numpy_erosion_equals_the_tf_pipeline_erosion():
  tf = pytest.importorskip("tensorflow", reason="compares with the tf.data erosion")
  from data_pipeline import morphology

  mask = (np.random.default_rng(1).random((40, 52)) > 0.04).astype(np.uint8)
  for size in range(1, protocol.MAX_KERNEL_SIZE + 1):
    expected = morphology.erode(tf.constant(mask), tf.constant(size), use_opencv=False)
    np.testing.assert_array_equal(trimaps.erode(mask, size), expected.numpy(),
                                  err_msg=str(size))


def test_trimap_from_alpha_marks_only_eroded_definite_regions():
  alpha = np.zeros((20, 20), np.uint8)
  alpha[5:15, 5:15] = 255
  alpha[5, 5:15] = 100  # a soft edge row
  trimap = trimaps.trimap_from_alpha(alpha, 3, 1)
  assert set(np.unique(trimap)) <= {0, 128, 255}
  assert (trimap[alpha == 100] == 128).all()
  np.testing.assert_array_equal(trimap[alpha == 0], 0)  # size 1: nothing eroded
  # The 3x3 ellipse (a cross) removes the definite foreground's outer ring.
  assert (trimap[7:14, 6:14] == 255).all() and (trimap[6, 6:14] == 128).all()


@pytest.fixture(scope="module")
def stream():
  return synthetic_stream.SyntheticStream(**OPTIONS)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_batches_keep_the_training_contract(stream):
  (batch,) = _take(stream.batches(batch_size=3, crop_size=CROP, seed=5), 1)
  for key in ("image", "fg", "bg"):
    assert batch[key].shape == (3, CROP, CROP, 3) and batch[key].dtype == np.float32
    assert 0.0 <= batch[key].min() and batch[key].max() <= 1.0
  assert batch["alpha"].shape == (3, CROP, CROP, 1) and batch["alpha"].dtype == np.float32
  assert batch["trimap"].shape == (3, CROP, CROP, 1) and batch["trimap"].dtype == np.uint8
  assert set(np.unique(batch["trimap"])) <= {0, 128, 255}
  assert (batch["trimap"] == 128).any()  # crops are centred on the unknown region
  composite = batch["fg"] * batch["alpha"] + batch["bg"] * (1 - batch["alpha"])
  np.testing.assert_allclose(batch["image"], composite, atol=1e-6)
  # Known regions agree with the alpha.
  assert (batch["alpha"][batch["trimap"] == 255] == 1).all()
  assert (batch["alpha"][batch["trimap"] == 0] == 0).all()


def test_same_seed_same_batches_other_seed_other_batches(stream):
  first = _take(stream.batches(batch_size=2, crop_size=CROP, seed=1), 3)
  again = _take(synthetic_stream.SyntheticStream(**OPTIONS).batches(
      batch_size=2, crop_size=CROP, seed=1), 3)
  other = _take(stream.batches(batch_size=2, crop_size=CROP, seed=2), 3)
  for a, b, c in zip(first, again, other):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], c["image"])


def test_shards_split_the_one_host_stream_and_resume_skips_exactly(stream):
  whole = _take(stream.batches(batch_size=4, crop_size=CROP, seed=3), 3)
  shards = [_take(stream.batches(batch_size=2, crop_size=CROP, seed=3, shard_index=s,
                                 num_shards=2), 3) for s in range(2)]
  for b in range(3):
    for key in whole[b]:
      np.testing.assert_array_equal(
          np.concatenate([shards[0][b][key], shards[1][b][key]]), whole[b][key])
  resumed = _take(stream.batches(batch_size=4, crop_size=CROP, seed=3, skip_batches=2), 1)
  for key in whole[2]:
    np.testing.assert_array_equal(resumed[0][key], whole[2][key])


def test_every_foreground_appears_once_per_backgrounds_per_foreground_in_an_epoch(stream):
  epoch = stream.epoch_length
  order = synthetic_stream._epoch_order(7, 0, epoch)
  counts = np.bincount(order % OPTIONS["num_foregrounds"], minlength=OPTIONS["num_foregrounds"])
  np.testing.assert_array_equal(counts, OPTIONS["backgrounds_per_foreground"])


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"crop_size": 40}, "crop_size must be a multiple of 16"),
    ({"shard_index": 2, "num_shards": 2}, r"shard_index must be in \[0, num_shards=2\)"),
    ({"skip_batches": -1}, "skip_batches must be >= 0"),
])
def test_bad_arguments_are_named(stream, kwargs, message):
  arguments = dict(batch_size=2, crop_size=CROP) | kwargs
  with pytest.raises(ValueError, match=message):
    next(stream.batches(**arguments))


def test_bad_options_are_named():
  with pytest.raises(ValueError, match="num_foregrounds must be a positive integer"):
    synthetic_stream.SyntheticStream(num_foregrounds=0)
  with pytest.raises(ValueError, match=r"max_size \(10\) must be >= min_size \(20\)"):
    synthetic_stream.SyntheticStream(min_size=20, max_size=10)
