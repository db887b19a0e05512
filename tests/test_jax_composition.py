"""The JAX executor of the matting protocol against the tf.data reference, example by example.

Both executors take the same decisions (data_pipeline.protocol); the bounds are those
data_pipeline/jax_composition.py's docstring states and explains.
"""

import pathlib

import chex
import jax
import numpy as np
import pytest

from data_pipeline import jax_composition, jax_pipeline, protocol, synthetic

tf = pytest.importorskip("tensorflow")
from data_pipeline import composition  # noqa: E402  (needs TensorFlow)

_PHOTOS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "alphamatting_lowres"
_LEVEL = 1.0 / 255.0


def _switch(values):
  def load(index):
    return tf.switch_case(tf.cast(index, tf.int32),
                          [lambda v=v: tuple(tf.constant(x) for x in v) for v in values])
  return load


def _plan(foregrounds, alphas, backgrounds, crop, index, seed):
  """(decisions, `jax_composition.plan`) of example `index`."""
  decisions = protocol.draw(seed, index, num_foregrounds=len(foregrounds),
                            num_backgrounds=len(backgrounds), epoch_length=len(foregrounds))
  first, second = int(decisions.foreground_index), int(decisions.second_index)
  return decisions, jax_composition.plan(
      foregrounds[first], alphas[first], foregrounds[second], alphas[second],
      backgrounds[int(decisions.background_index)], decisions, crop)


def _references(foregrounds, alphas, backgrounds, crop, indices, seed=5):
  """(the tf.data reference's examples and decisions, `jax_composition.plan`s) of the given
  example indices."""
  load_fg = _switch([(f, a[..., None]) for f, a in zip(foregrounds, alphas)])
  load_bg_tuple = _switch([(b,) for b in backgrounds])
  references, plans = [], []
  for index in indices:
    decisions, example_plan = _plan(foregrounds, alphas, backgrounds, crop, index, seed)
    floats, ints = protocol.as_vectors(decisions)
    example, taken = composition.compose(load_fg, lambda i: load_bg_tuple(i)[0],
                                         tf.constant(floats), tf.constant(ints),
                                         crop_size=crop)
    references.append(({k: v.numpy() for k, v in example._asdict().items()},
                       {k: v.numpy() for k, v in taken.items()}))
    plans.append(example_plan)
  return references, plans


def _executor_output(plans, crop, per_example=None):
  """The JAX executor's batch of `plans`; `per_example` forces its form (default: the
  platform's)."""
  batch = jax_composition.collate(plans)
  if per_example is None:
    output = jax_composition.compose_batch(batch, crop)
  else:
    output = jax_composition._compose(jax.device_put(batch), crop_size=crop,
                                      per_example=per_example)
  return {k: (np.asarray(v) if k != "decisions" else {d: np.asarray(x) for d, x in v.items()})
          for k, v in output.items()}


def _check(references, output, per_example=None):
  """Asserts the stated bounds; returns the branches the examples took. `per_example`:
  the executor's form (default: the platform's, per example on the CPU)."""
  if per_example is None:
    per_example = jax.default_backend() == "cpu"
  seen = set()
  for i, (expected, taken) in enumerate(references):
    for name in ("merge", "top", "left", "centred", "has_unknown", "jitter"):
      assert int(output["decisions"][name][i]) == int(taken[name]), (i, name)
    np.testing.assert_array_equal(output["alpha"][i], expected["alpha"])
    np.testing.assert_array_equal(output["trimap"][i], expected["trimap"])
    assert output["trimap"].dtype == np.uint8
    # The merge is exact: merged or not, the foreground differs by the jitter's rounding only.
    if not taken["jitter"]:
      np.testing.assert_array_equal(output["fg"][i], expected["fg"])
    assert np.abs(output["fg"][i] - expected["fg"]).max() <= 1e-4
    assert np.abs(output["bg"][i] - expected["bg"]).max() <= _LEVEL + 1e-7
    assert np.abs(output["image"][i] - expected["image"]).max() <= _LEVEL + 1e-4
    seen.update(k for k in ("merge", "resize", "hflip", "centred", "has_unknown", "jitter")
                if taken[k])
    if taken["has_unknown"] and not taken["centred"]:
      seen.add("uniform_crop")
  # The background reads a window where every example of the batch (of one, per example)
  # crops, whole rows otherwise.
  crops = [bool(taken["has_unknown"]) for _, taken in references]
  for every_crop in (crops if per_example else [all(crops)]):
    seen.add("windowed_background" if every_crop else "whole_background")
  return seen


def test_the_merge_is_the_references_division_bit_for_bit():
  """`_merged_foreground` against the tf.data executor's expression and NumPy's float32
  operations (one rounding each), on 12 million random merged values: written the plain
  way, XLA's reciprocal and fused multiply-adds put 42 of 6 million one level off."""
  table = jax_composition._alpha_values()
  merge = jax.jit(jax_composition._merged_foreground)
  one, epsilon = np.float32(1), np.float32(1e-5)
  for seed in range(4):
    rng = np.random.default_rng(seed)
    fg, f2 = rng.integers(0, 256, (2, 1_000_000, 3)).astype(np.float32)
    code1, code2 = rng.integers(0, 256, (2, 1_000_000))
    a1, a2 = table[code1], table[code2]
    merged_alpha = table[jax_composition._MERGED + 256 * code1 + code2]
    np.testing.assert_array_equal(merged_alpha, one - (one - a1) * (one - a2))
    expected = np.floor((fg * a1[:, None] + f2 * (one - a1[:, None]) * a2[:, None])
                        / (merged_alpha[:, None] + epsilon))
    t1, t2 = tf.constant(a1[:, None]), tf.constant(a2[:, None])
    through_tf = tf.floor((tf.constant(fg) * t1 + tf.constant(f2) * (1.0 - t1) * t2)
                          / (composition._merge_alpha(t1, t2) + 1e-5)).numpy()
    np.testing.assert_array_equal(through_tf, expected, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(np.asarray(merge(fg, f2, a1, a2, merged_alpha)), expected,
                                  err_msg=f"seed {seed}")


@pytest.fixture(scope="module")
def synthetic_references():
  """The reference's examples of the synthetic case (computed once for both forms of the
  executor): crop 64, and crop 160, which exceeds every foreground (the enlargement
  path); all-opaque and all-transparent alphas give crops without an unknown pixel."""
  foregrounds, alphas, backgrounds = synthetic.synthetic_dataset(4, 3, 90, 150, seed=1)
  foregrounds.append(foregrounds[0])
  alphas.append(np.full_like(alphas[0], 255))
  return {crop: _references(foregrounds, alphas, backgrounds, crop=crop, indices=range(count))
          for crop, count in ((64, 16), (160, 6))}


@pytest.mark.parametrize("per_example", [True, False], ids=["per_example", "batch_wide"])
def test_equals_the_tf_reference_on_synthetic_images(per_example, synthetic_references):
  """Both forms of the executor: per example (the CPU's) and batch-wide (accelerators')."""
  seen = set()
  for crop, (references, plans) in synthetic_references.items():
    seen |= _check(references, _executor_output(plans, crop, per_example),
                   per_example=per_example)
  assert {"merge", "resize", "hflip", "centred", "has_unknown", "jitter",
          "windowed_background", "whole_background"} <= seen


@pytest.mark.skipif(not _PHOTOS.is_dir(), reason=f"needs the shared photographs in {_PHOTOS}")
def test_equals_the_tf_reference_on_the_shipped_photos():
  from PIL import Image

  paths = sorted(_PHOTOS.glob("image_*.png"))[:5]
  foregrounds = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
  alphas = [np.asarray(Image.open(str(p).replace("image_", "alpha_")).convert("L"))
            for p in paths]
  references, plans = _references(foregrounds, alphas, foregrounds, crop=320,
                                   indices=range(8))
  seen = _check(references, _executor_output(plans, 320))
  assert {"merge", "centred"} <= seen


def test_collated_images_reach_the_cpu_backend_without_a_copy():
  """The batch's images start on 64-byte boundaries, so the CPU backend's device_put uses
  them in place (a copy into fresh memory cost ~0.15 s per batch of 1-2 MP images)."""
  foregrounds, alphas, backgrounds = synthetic.synthetic_dataset(3, 2, 90, 150, seed=2)
  plans = [_plan(foregrounds, alphas, backgrounds, 64, index, seed=0)[1]
           for index in range(3)]
  batch = jax_composition.collate(plans)
  for key in ("fg", "alpha", "fg2", "alpha2", "background"):
    assert batch[key].ctypes.data % 64 == 0, key
    assert batch[key].flags.c_contiguous, key
  # Each image sits at the start of its row, zeros after it.
  for i, p in enumerate(plans):
    size = p["alpha"].size
    np.testing.assert_array_equal(batch["alpha"][i, :size], p["alpha"].reshape(-1))
    assert not batch["alpha"][i, size:].any()
  if jax.default_backend() == "cpu":
    on_device = jax.device_put(batch["fg"])
    assert on_device.unsafe_buffer_pointer() == batch["fg"].ctypes.data


def test_packed_erosion_is_opencvs_for_every_kernel_size():
  from data_pipeline import trimaps
  sizes = np.arange(1, protocol.MAX_KERNEL_SIZE + 1)
  rng = np.random.default_rng(3)
  height, width, canvas = 45, 77, (64, 128)  # the image inside a larger canvas
  # Sparse holes and a few larger blobs, so every kernel size erodes something and keeps
  # something; definite pixels outside the image must not matter.
  definite = rng.random((sizes.size, *canvas)) > 0.004
  for example in definite:
    for _ in range(2):
      row, col = rng.integers(0, height), rng.integers(0, width)
      example[row:row + 4, col:col + 9] = False
  inside = np.zeros(canvas, bool)
  inside[:height, :width] = True
  columns = np.stack([np.stack(jax_composition._kernel_columns(k)) for k in sizes])
  (bad,) = jax.vmap(jax_composition._pack_columns)(inside & ~definite)
  # The CPU's loop over the examples and the accelerators' vmapped form.
  for hits in (jax_composition._looped_hits, jax_composition._vectorised_hits):
    eroded = ~np.asarray(jax.vmap(jax_composition._unpack_columns)(
        hits(bad, columns[:, 0], columns[:, 1])))
    for k, example, out in zip(sizes, definite, eroded):
      expected = trimaps.erode(example[:height, :width], int(k)).astype(bool)
      np.testing.assert_array_equal(out[:height, :width], expected,
                                    err_msg=f"{hits.__name__}, kernel {k}")
      assert 0 < expected.sum() < height * width


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_canvas_sides_bound_the_compilations():
  assert [jax_composition.canvas_side(n) for n in (1, 256, 257, 700, 4096, 4097)] == [
      256, 256, 384, 768, 4096, 5120]
  foregrounds, alphas, backgrounds = synthetic.synthetic_dataset(3, 2, 100, 250, seed=2)

  def batch(indices):
    plans = []
    for index in indices:
      d = protocol.draw(0, index, num_foregrounds=3, num_backgrounds=2, epoch_length=3)
      f, s, b = int(d.foreground_index), int(d.second_index), int(d.background_index)
      plans.append(jax_composition.plan(foregrounds[f], alphas[f], foregrounds[s], alphas[s],
                                        backgrounds[b], d, 64))
    return jax_composition.collate(plans)

  # Examples without the 640 resize: their canvas is the images' own (<= 250 pixels).
  kept = [k for k in range(40) if not protocol.draw(0, k, num_foregrounds=3,
                                                    num_backgrounds=2, epoch_length=3).resize]
  first, second = batch(kept[:2]), batch(kept[2:4])
  assert first["fg"].shape == second["fg"].shape == (2, 256 * 256, 3)
  assert first["warp_row_x"].shape == second["warp_row_x"].shape == (2, 256)
  before = jax_composition._compose._cache_size()
  jax_composition.compose_batch(first, 64)
  jax_composition.compose_batch(second, 64)
  # Other images of the same canvas reuse the compiled executor.
  assert jax_composition._compose._cache_size() == before + 1


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_a_split_batch_is_composited_on_each_device_without_collectives():
  if jax.device_count() < 2:
    pytest.skip("needs several (fake) devices; conftest sets XLA_FLAGS for 4")
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
  source = jax_pipeline.host_source("synthetic", num_foregrounds=4, num_backgrounds=4,
                                    min_size=90, max_size=150)
  stream = jax_pipeline.JaxStream(source, batch_size=2 * jax.device_count(), crop_size=64,
                                  num_threads=1)
  host_batch = next(stream.host_batches())
  placed = jax.device_put(host_batch, split)
  compiled = jax_composition._split_compose(split, 64).lower(placed).compile().as_text()
  for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
    assert collective not in compiled
  output = jax_composition.compose_batch(placed, 64, split)
  assert output["image"].sharding == split
  chex.assert_trees_all_equal(jax.device_get(output),
                              jax.device_get(jax_composition.compose_batch(host_batch, 64)))


# ------------------------------------------------------------------ the stream


def _stream_batches(count, **kwargs):
  from data_pipeline import jax_pipeline

  source = jax_pipeline.host_source("synthetic", **_SYNTHETIC)
  iterator = jax_pipeline.JaxStream(source, **kwargs).batches()
  return [{k: np.asarray(v) for k, v in next(iterator).items()} for _ in range(count)]


_SYNTHETIC = dict(num_foregrounds=3, num_backgrounds=4, min_size=80, max_size=140, seed=0)


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_stream_makes_the_tf_data_streams_examples():
  import data_pipeline

  tf_stream = data_pipeline.train_batches(data_pipeline.build_source("synthetic", **_SYNTHETIC),
                                          batch_size=4, crop_size=64, seed=3)
  for ours in _stream_batches(2, batch_size=4, crop_size=64, seed=3):
    theirs = next(tf_stream)
    np.testing.assert_array_equal(ours["alpha"], theirs["alpha"])
    np.testing.assert_array_equal(ours["trimap"], theirs["trimap"])
    assert np.abs(ours["image"] - theirs["image"]).max() <= _LEVEL + 1e-4


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_stream_resumes_and_shards_like_the_tf_data_stream():
  whole = _stream_batches(3, batch_size=4, crop_size=64, seed=4)
  resumed = _stream_batches(1, batch_size=4, crop_size=64, seed=4, skip_batches=2)
  for key in ("image", "alpha", "trimap"):
    np.testing.assert_array_equal(resumed[0][key], whole[2][key])
  # Two shards of 2 are the one-host batch of 4, in order.
  halves = [_stream_batches(1, batch_size=2, crop_size=64, seed=4, shard_index=i,
                            num_shards=2)[0] for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["trimap"] for h in halves]),
                                whole[0]["trimap"])


def test_canvases_from_headers_are_the_collated_batches():
  from data_pipeline import jax_pipeline

  source = jax_pipeline.host_source("synthetic", **_SYNTHETIC)
  stream = jax_pipeline.JaxStream(source, batch_size=3, crop_size=64, seed=6)
  for index, batch in zip(range(4), stream.host_batches()):
    assert stream.canvases(index) == (
        (batch["warp_row_x"].shape[1], batch["warp_col_x"].shape[1]), batch["fg"].shape[1],
        batch["background"].shape[1:3])


def test_host_batches_run_at_most_a_few_batches_ahead():
  """The host's prefetch counts whole batches (~400 MB each at 1-2 MP): it must stop a
  few batches ahead of the consumer instead of filling memory."""
  import time

  from data_pipeline import jax_pipeline

  source = jax_pipeline.host_source("synthetic", **_SYNTHETIC)
  stream = jax_pipeline.JaxStream(source, batch_size=8, crop_size=64, seed=7, num_threads=2)
  planned = []
  plan = stream.plan
  stream.plan = lambda counter: planned.append(counter) or plan(counter)
  batches = stream.host_batches()
  next(batches)
  time.sleep(1.0)  # ample time to plan hundreds of these small examples
  ahead = len(planned) // stream.batch_size - 1
  assert 1 <= ahead <= 4, f"{ahead} batches planned ahead"
