"""The JAX executor's stream on the synthetic source, without TensorFlow: the batch contract,
the trimap rules, determinism, and its arguments and options refused by name.

(Its equivalence with the tf.data reference, resuming and sharding: test_jax_composition.py.)
"""

import chex
import numpy as np
import pytest

from data_pipeline import catalog, jax_pipeline

CROP = 32
OPTIONS = dict(num_foregrounds=3, num_backgrounds=2, min_size=40, max_size=56, seed=0,
               backgrounds_per_foreground=2)


@pytest.fixture(scope="module")
def source():
  return jax_pipeline.host_source("synthetic", **OPTIONS)


def _take(source, count, **kwargs):
  iterator = jax_pipeline.JaxStream(source, crop_size=CROP, num_threads=1,
                                    **kwargs).batches()
  return [{key: np.asarray(value) for key, value in next(iterator).items()}
          for _ in range(count)]


def test_batches_keep_the_training_contract(source):
  (batch,) = _take(source, 1, batch_size=2, seed=1)  # compiled once with the next test
  for key in ("image", "fg", "bg"):
    chex.assert_shape(batch[key], (2, CROP, CROP, 3))
    chex.assert_type(batch[key], np.float32)
    assert 0.0 <= batch[key].min() and batch[key].max() <= 1.0
  chex.assert_shape([batch["alpha"], batch["trimap"]], (2, CROP, CROP, 1))
  chex.assert_type([batch["alpha"], batch["trimap"]], [np.float32, np.uint8])
  assert set(np.unique(batch["trimap"])) <= {0, 128, 255}
  assert (batch["trimap"] == 128).any()  # crops are centred on the unknown region
  composite = batch["fg"] * batch["alpha"] + batch["bg"] * (1 - batch["alpha"])
  np.testing.assert_allclose(batch["image"], composite, atol=1e-6)
  # Known regions agree with the alpha, and every fractional alpha is unknown.
  assert (batch["alpha"][batch["trimap"] == 255] == 1).all()
  assert (batch["alpha"][batch["trimap"] == 0] == 0).all()
  fractional = (batch["alpha"] > 0) & (batch["alpha"] < 1)
  assert (batch["trimap"][fractional] == 128).all()


def test_same_seed_same_batches_other_seed_other_batches(source):
  # One batch each: every new canvas compiles the executor again.
  (first,) = _take(source, 1, batch_size=2, seed=1)
  (again,) = _take(jax_pipeline.host_source("synthetic", **OPTIONS), 1, batch_size=2, seed=1)
  (other,) = _take(source, 1, batch_size=2, seed=2)
  chex.assert_trees_all_equal(first, again)
  assert not np.array_equal(first["image"], other["image"])


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"crop_size": 40}, "crop_size must be a multiple of 16"),
    ({"shard_index": 2, "num_shards": 2}, r"shard_index must be in \[0, num_shards=2\)"),
    ({"skip_batches": -1}, "skip_batches must be >= 0"),
])
def test_bad_arguments_are_named(source, kwargs, message):
  arguments = dict(batch_size=2, crop_size=CROP) | kwargs
  with pytest.raises(ValueError, match=message):
    jax_pipeline.JaxStream(source, **arguments)


def test_bad_options_are_named():
  with pytest.raises(ValueError, match="num_foregrounds must be a positive integer"):
    jax_pipeline.host_source("synthetic", num_foregrounds=0)
  with pytest.raises(ValueError, match=r"max_size \(10\) must be >= min_size \(20\)"):
    jax_pipeline.host_source("synthetic", min_size=20, max_size=10)
  with pytest.raises(ValueError, match="backgrounds_per_foreground must be a positive"):
    jax_pipeline.host_source("synthetic", backgrounds_per_foreground=0, **{
        key: value for key, value in OPTIONS.items() if key != "backgrounds_per_foreground"})
  with pytest.raises(ValueError, match="unknown source 'coco'; expected one of synthetic"):
    jax_pipeline.host_source("coco")


def test_each_source_is_declared_once_for_both_executors():
  """Both executors' sources come from `catalog.SOURCES`: the same names and options."""
  assert list(catalog.SOURCES) == ["synthetic", "adobe", "d646", "folder", "tfds"]
  assert catalog.options("synthetic") == list(OPTIONS)
  assert catalog.options("folder") == ["root", "fg_dir", "alpha_dir", "bg_dir",
                                       "backgrounds_per_foreground"]
  import data_pipeline

  assert data_pipeline.SOURCES is catalog.SOURCES
  with pytest.raises(AttributeError, match="SyntheticStream .* was removed: use jax_pipeline"):
    data_pipeline.SyntheticStream  # noqa: B018
