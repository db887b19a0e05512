"""The tf.data compositing pipeline (protocol parity, batches, determinism, sharding), the
trimap erosions, and the sources' checks in both executors."""

import importlib.util
import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import data_pipeline
from a2u_jax import inputs
from data_pipeline import composition, jax_pipeline, morphology, protocol, sources, synthetic
from data_pipeline import files, trimaps

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _numpy_reference():
  """benchmarks/dim_protocol_numpy.py: the authors' transform in NumPy + OpenCV."""
  pytest.importorskip("cv2")
  spec = importlib.util.spec_from_file_location(
      "dim_protocol_numpy", ROOT / "benchmarks" / "dim_protocol_numpy.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _erode_loop(mask, element):
  """Binary erosion by its definition; outside the image counts as foreground."""
  anchor = element.shape[0] // 2
  height, width = mask.shape
  out = np.ones_like(mask)
  for y in range(height):
    for x in range(width):
      for i, j in zip(*np.nonzero(element)):
        yy, xx = y + i - anchor, x + j - anchor
        if 0 <= yy < height and 0 <= xx < width and not mask[yy, xx]:
          out[y, x] = 0
  return out


# ---------------------------------------------------------------- morphology


def test_ellipse_footprint_hand_cases():
  np.testing.assert_array_equal(morphology.ellipse_footprint(1), [[1]])
  # Even sizes: anchor at (1, 1), the first row only reaches the anchor column.
  np.testing.assert_array_equal(morphology.ellipse_footprint(2), [[0, 1], [1, 1]])
  np.testing.assert_array_equal(morphology.ellipse_footprint(3),
                                [[0, 1, 0], [1, 1, 1], [0, 1, 0]])
  np.testing.assert_array_equal(morphology.ellipse_footprint(5),
                                [[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1],
                                 [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]])


def test_ellipse_footprint_matches_opencv_for_every_protocol_size():
  cv2 = pytest.importorskip("cv2")
  for size in range(1, 30):
    np.testing.assert_array_equal(
        morphology.ellipse_footprint(size),
        cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)), err_msg=str(size))


def _erosions(mask, size):
  """The TF erosion, OpenCV's (where installed) and the NumPy one (`trimaps`, which makes
  the evaluation sets' synthetic trimaps)."""
  erosions = {"tf": morphology.erode(tf.constant(mask), tf.constant(size),
                                     use_opencv=False).numpy(),
              "numpy": trimaps.erode(mask, size)}
  if importlib.util.find_spec("cv2"):
    erosions["opencv"] = morphology.erode(tf.constant(mask), tf.constant(size),
                                          use_opencv=True).numpy()
  return erosions


def test_erosions_match_their_definition_for_odd_and_even_sizes():
  rng = np.random.default_rng(0)
  mask = (rng.random((23, 31)) > 0.08).astype(np.uint8)
  for size in (1, 2, 3, 4, 7, 10, 29):
    expected = _erode_loop(mask, morphology.ellipse_footprint(size))
    for name, got in _erosions(mask, size).items():
      np.testing.assert_array_equal(got, expected, err_msg=f"{name} {size}")


def test_erosions_agree_for_every_protocol_size():
  rng = np.random.default_rng(1)
  mask = (rng.random((64, 80)) > 0.03).astype(np.uint8)
  for size in range(1, protocol.MAX_KERNEL_SIZE + 1):
    erosions = _erosions(mask, size)
    for name, got in erosions.items():
      np.testing.assert_array_equal(got, erosions["tf"], err_msg=f"{name} {size}")


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


# ------------------------------------------------- the protocol against NumPy/OpenCV


def _soft_disc(rng, height, width):
  yy, xx = np.mgrid[:height, :width]
  radius = 0.35 * min(height, width)
  alpha = np.clip((radius - np.hypot(yy - height / 2, xx - width / 2)) / 6, 0, 1)
  return (rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
          np.round(alpha * 255).astype(np.uint8))


def _loaders(arrays):
  def load(index):
    return tf.switch_case(index, [lambda a=a: tuple(tf.constant(x) for x in a)
                                  for a in arrays])
  return load


_FORCED = ("merge", "resize", "angle", "scale_x", "scale_y", "shear", "flip_x", "flip_y",
           "hflip", "fg_kernel", "bg_kernel", "uniform_top", "uniform_left", "pick",
           "hue_degrees", "saturation_draw", "value_draw")


def _compare_with_reference(foregrounds, backgrounds, crop, seeds):
  reference = _numpy_reference()
  fg_arrays = [(fg, alpha[..., None]) for fg, alpha in foregrounds]
  bg_arrays = [(bg,) for bg in backgrounds]
  load_fg = _loaders(fg_arrays)
  load_bg_tuple = _loaders(bg_arrays)

  def load_bg(index):
    return load_bg_tuple(index)[0]

  seen = set()
  for seed in seeds:
    floats, ints = protocol.draw_vectors(3, seed, len(foregrounds), len(backgrounds),
                                         len(foregrounds))
    example, decisions = composition.compose(load_fg, load_bg, tf.constant(floats),
                                             tf.constant(ints), crop_size=crop)
    d = {k: v.numpy() for k, v in decisions.items()}
    index = int(d["foreground_index"])
    given = {k: d[k].item() for k in _FORCED}
    second, background = int(d["second_index"]), int(d["background_index"])
    expected = reference.compose_reference(
        foregrounds[index][0], foregrounds[index][1], foregrounds[second][0],
        foregrounds[second][1], backgrounds[background], crop,
        np.random.default_rng(0), given)
    got = {k: getattr(example, k).numpy() for k in ("image", "fg", "bg", "alpha", "trimap")}
    if d["has_unknown"]:
      assert expected["top_left"] == (int(d["top"]), int(d["left"]))
    # Everything but the background's interpolation kernel is bit-exact.
    np.testing.assert_array_equal(got["trimap"], expected["trimap"])
    np.testing.assert_allclose(got["alpha"], expected["alpha"], atol=1e-7)
    np.testing.assert_allclose(got["fg"], expected["fg"], atol=2e-5)
    seen.update(k for k in ("merge", "resize", "hflip", "centred", "has_unknown") if d[k])
    if not d["has_unknown"]:
      seen.add("resized_to_crop")
    # Bicubic a=-0.5 (ours) vs OpenCV's a=-0.75: close, not equal, on noise backgrounds.
    assert np.abs(got["bg"] - expected["bg"]).mean() < 0.05
  return seen


def test_protocol_matches_the_numpy_opencv_transcription():
  rng = np.random.default_rng(0)
  foregrounds = [_soft_disc(rng, 150, 190), _soft_disc(rng, 120, 100),
                 _soft_disc(rng, 176, 170)]
  backgrounds = [rng.integers(0, 256, (260, 280, 3), dtype=np.uint8),
                 rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)]
  seen = _compare_with_reference(foregrounds, backgrounds, crop=96, seeds=range(10))
  # Crop 144 is larger than the 120x100 foreground: the enlargement path.
  seen |= _compare_with_reference(foregrounds, backgrounds, crop=144, seeds=range(4))
  assert {"merge", "resize", "hflip", "centred", "has_unknown"} <= seen


def test_protocol_with_no_unknown_region_resizes_to_the_crop():
  rng = np.random.default_rng(2)
  opaque = (rng.integers(0, 256, (90, 110, 3), dtype=np.uint8),
            np.full((90, 110), 255, np.uint8))
  transparent = (opaque[0], np.zeros((90, 110), np.uint8))
  backgrounds = [rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)]
  seen = _compare_with_reference([opaque, transparent], backgrounds, crop=64,
                                 seeds=range(6))
  assert "resized_to_crop" in seen


# ------------------------------------------------------------------ batches


@pytest.fixture(scope="module")
def small_source():
  return data_pipeline.build_source("synthetic", num_foregrounds=3, num_backgrounds=4,
                                    min_size=80, max_size=140, seed=0)


def _batches(source, count, **kwargs):
  iterator = data_pipeline.train_batches(source, **kwargs)
  return [next(iterator) for _ in range(count)]


def test_batch_shapes_dtypes_and_ranges(small_source):
  (batch,) = _batches(small_source, 1, batch_size=3, crop_size=64)
  for key in ("image", "fg", "bg"):
    assert batch[key].shape == (3, 64, 64, 3) and batch[key].dtype == np.float32
    assert 0.0 <= batch[key].min() and batch[key].max() <= 1.0
  assert batch["alpha"].shape == (3, 64, 64, 1) and batch["alpha"].dtype == np.float32
  assert 0.0 <= batch["alpha"].min() and batch["alpha"].max() <= 1.0
  assert batch["trimap"].shape == (3, 64, 64, 1) and batch["trimap"].dtype == np.uint8
  np.testing.assert_allclose(
      batch["image"], batch["alpha"] * batch["fg"] + (1 - batch["alpha"]) * batch["bg"],
      atol=1e-6)


def test_trimap_values_and_unknown_band_covers_fractional_alpha(small_source):
  for batch in _batches(small_source, 3, batch_size=4, crop_size=64, seed=5):
    assert set(np.unique(batch["trimap"])) <= {0, 128, 255}
    fractional = (batch["alpha"] > 1e-5) & (batch["alpha"] < 1 - 1e-5)
    assert np.all(batch["trimap"][fractional] == 128)
    assert np.all(batch["alpha"][batch["trimap"] == 255] >= 1 - 1e-5)
    assert np.all(batch["alpha"][batch["trimap"] == 0] <= 1e-5)


def test_same_seed_same_batches_other_seed_other_batches(small_source):
  first = _batches(small_source, 2, batch_size=2, crop_size=64, seed=7)
  again = _batches(small_source, 2, batch_size=2, crop_size=64, seed=7)
  other = _batches(small_source, 2, batch_size=2, crop_size=64, seed=8)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_shards_are_disjoint_and_together_equal_one_host(small_source):
  whole = _batches(small_source, 2, batch_size=4, crop_size=64, seed=3)
  shards = [_batches(small_source, 2, batch_size=2, crop_size=64, seed=3,
                     shard_index=s, num_shards=2) for s in range(2)]
  for step in range(2):
    np.testing.assert_array_equal(
        np.concatenate([shards[0][step]["alpha"], shards[1][step]["alpha"]]),
        whole[step]["alpha"])
    assert not np.array_equal(shards[0][step]["image"], shards[1][step]["image"])


def test_skip_batches_resumes_the_same_stream(small_source):
  stream = _batches(small_source, 3, batch_size=2, crop_size=64, seed=4)
  resumed = _batches(small_source, 1, batch_size=2, crop_size=64, seed=4, skip_batches=2)
  np.testing.assert_array_equal(resumed[0]["image"], stream[2]["image"])


def test_epoch_visits_every_foreground_equally(small_source):
  length = small_source.epoch_length
  for epoch in range(2):
    order = [protocol.foreground_index(3, epoch * length + k, length,
                                       small_source.num_foregrounds) for k in range(length)]
    assert sorted(order) == sorted(list(range(small_source.num_foregrounds))
                                   * small_source.backgrounds_per_foreground)


def test_split_for_devices():
  batch = {"image": np.arange(8 * 2).reshape(8, 2), "trimap": np.zeros((8, 1))}
  split = data_pipeline.split_for_devices(batch, 4)
  assert split["image"].shape == (4, 2, 2) and split["trimap"].shape == (4, 2, 1)
  np.testing.assert_array_equal(split["image"][1, 0], batch["image"][2])
  with pytest.raises(ValueError, match="not divisible by 3 devices"):
    data_pipeline.split_for_devices(batch, 3)


def test_data_pipeline_never_imports_the_model_package():
  # The dependency goes one way: a2u_jax uses data_pipeline, never the reverse.
  for path in sorted((ROOT / "data_pipeline").glob("*.py")):
    for line in path.read_text().splitlines():
      assert not re.match(r"\s*(from|import) a2u_jax", line), f"{path.name}: {line.strip()}"


def test_model_inputs_normalisation():
  image = np.full((1, 2, 2, 3), 0.5, np.float32)
  trimap = np.array([0, 128, 255, 0], np.uint8).reshape(1, 2, 2, 1)
  out = np.asarray(inputs.model_inputs(image, trimap))
  assert out.shape == (1, 2, 2, 4)
  np.testing.assert_allclose(out[0, 0, 0, :3], (0.5 - np.array([0.485, 0.456, 0.406]))
                             / np.array([0.229, 0.224, 0.225]), rtol=1e-6)
  np.testing.assert_allclose(out[0, :, :, 3].ravel(), [0, 128 / 255, 1, 0], rtol=1e-6)
  with pytest.raises(ValueError, match="trimap"):
    inputs.model_inputs(image, trimap[:, :1])


def test_synthetic_alphas_have_soft_and_hard_regions():
  fg, alpha = synthetic.synthetic_foreground(np.random.default_rng(0), 200, 240)
  assert fg.shape == (200, 240, 3) and alpha.shape == (200, 240)
  fractional = np.mean((alpha > 0) & (alpha < 255))
  assert np.any(alpha == 255) and np.any(alpha == 0) and 0.01 < fractional < 0.5


# ---------------------------------------------------------------- bad input


def _save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)
  return path


def _folder(tmp_path, sizes=((70, 90), (80, 60)), bg_size=(100, 120)):
  rng = np.random.default_rng(0)
  for i, (h, w) in enumerate(sizes):
    fg, alpha = _soft_disc(rng, h, w)
    _save(tmp_path / "fg" / f"img{i}.png", fg)
    _save(tmp_path / "alpha" / f"img{i}.png", alpha)
  _save(tmp_path / "bg" / "b0.jpg", rng.integers(0, 256, bg_size + (3,), dtype=np.uint8))
  return tmp_path


def test_folder_source_trains(tmp_path):
  source = data_pipeline.build_source("folder", root=_folder(tmp_path))
  assert source.num_foregrounds == 2 and source.num_backgrounds == 1
  (batch,) = _batches(source, 1, batch_size=2, crop_size=48)
  assert batch["image"].shape == (2, 48, 48, 3)


def test_missing_folder_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="alpha_dir: folder .*alpha does not exist"):
    (tmp_path / "fg").mkdir()
    data_pipeline.build_source("folder", root=tmp_path)


def test_empty_source_is_rejected(tmp_path):
  for name in ("fg", "alpha", "bg"):
    (tmp_path / name).mkdir()
  with pytest.raises(sources.SourceError, match="no foregrounds found"):
    data_pipeline.build_source("folder", root=tmp_path)


def test_unpaired_files_are_named(tmp_path):
  root = _folder(tmp_path)
  (root / "alpha" / "img1.png").unlink()
  with pytest.raises(sources.SourceError, match="have no alpha .*img1"):
    data_pipeline.build_source("folder", root=root)
  _save(root / "alpha" / "img1.png", np.zeros((80, 60), np.uint8))
  _save(root / "alpha" / "stray.png", np.zeros((8, 8), np.uint8))
  with pytest.raises(sources.SourceError, match="have no foreground .*stray"):
    data_pipeline.build_source("folder", root=root)


def test_size_mismatch_is_named(tmp_path):
  root = _folder(tmp_path)
  _save(root / "alpha" / "img0.png", np.zeros((70, 91), np.uint8))
  with pytest.raises(sources.SourceError, match="size mismatch: foreground .*img0.png is "
                     "90x70 but its alpha .*img0.png is 91x70"):
    data_pipeline.build_source("folder", root=root)


def test_unreadable_file_is_named(tmp_path):
  root = _folder(tmp_path)
  (root / "fg" / "img1.png").write_bytes(b"this is not an image")
  with pytest.raises(sources.SourceError, match="img1.png: not a readable image"):
    data_pipeline.build_source("folder", root=root)


def test_truncated_file_is_named_when_the_pipeline_reads_it(tmp_path):
  root = _folder(tmp_path, bg_size=(300, 300))
  background = root / "bg" / "b0.jpg"
  data = background.read_bytes()
  background.write_bytes(data[:len(data) // 2])  # header intact, data cut
  source = data_pipeline.build_source("folder", root=root)
  with pytest.raises(ValueError, match="cannot be decoded:\n  .*b0.jpg"):
    _batches(source, 1, batch_size=1, crop_size=48)


def test_grey_alpha_saved_as_rgb_is_accepted_and_rgba_foreground_rejected(tmp_path):
  root = _folder(tmp_path)
  alpha = np.asarray(Image.open(root / "alpha" / "img0.png"))
  _save(root / "alpha" / "img0.png", np.repeat(alpha[..., None], 3, axis=-1))
  source = data_pipeline.build_source("folder", root=root)
  fg, decoded = source.load_foreground(tf.constant(0))
  np.testing.assert_array_equal(decoded.numpy()[..., 0], alpha)
  rgba = np.concatenate([np.asarray(Image.open(root / "fg" / "img0.png")),
                         alpha[..., None]], axis=-1)
  _save(root / "fg" / "img0.png", rgba)
  with pytest.raises(sources.SourceError, match="img0.png: foreground has an alpha channel"):
    data_pipeline.build_source("folder", root=root)


def _colour(alpha):
  """`alpha` (h, w) uint8 as an RGB image whose channels differ where it is not 0 or 255."""
  rgb = np.repeat(alpha[..., None], 3, axis=-1)
  rgb[..., 2] = np.where((alpha > 0) & (alpha < 255), 255 - alpha, alpha)
  return rgb


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_grey_alpha_saved_as_rgb_reads_as_grey_in_both_executors(tmp_path, ext):
  root = _folder(tmp_path)
  alpha = np.asarray(Image.open(root / "alpha" / "img0.png"))
  (root / "alpha" / "img0.png").unlink()
  _save(root / "alpha" / f"img0{ext}", np.repeat(alpha[..., None], 3, axis=-1))
  # What either executor reads from the same file saved single-channel.
  _save(tmp_path / "grey" / f"img0{ext}", alpha)
  expected = np.asarray(Image.open(tmp_path / "grey" / f"img0{ext}"))
  _, tf_alpha = data_pipeline.build_source("folder", root=root).load_foreground(tf.constant(0))
  _, jax_alpha = jax_pipeline.host_source("folder", root=root).foreground(0)
  np.testing.assert_array_equal(tf_alpha.numpy()[..., 0], expected)
  np.testing.assert_array_equal(jax_alpha, expected)


def test_colour_alpha_is_refused_in_one_line_by_both_executors(tmp_path):
  root = _folder(tmp_path)
  path = root / "alpha" / "img1.png"
  _save(path, _colour(np.asarray(Image.open(path))))
  with pytest.raises(sources.SourceError) as tf_error:
    _batches(data_pipeline.build_source("folder", root=root), 2, batch_size=2, crop_size=48)
  stream = jax_pipeline.JaxStream(jax_pipeline.host_source("folder", root=root), batch_size=2,
                                  crop_size=48, num_threads=1)
  with pytest.raises(sources.SourceError) as jax_error:
    next(stream.batches())
  for error in (tf_error, jax_error):
    assert str(error.value) == f"{path}: {files.COLOUR_ALPHA}"


def test_a_background_that_is_not_an_image_is_named_at_start_up(tmp_path):
  """Found when the source is built (headers only), not when it is first drawn."""
  root = _folder(tmp_path)
  (root / "bg" / "notes.jpg").write_text("a text file with an image's name\n")
  message = "bg/notes.jpg: not a readable image"
  with pytest.raises(sources.SourceError, match=message):
    data_pipeline.build_source("folder", root=root)
  with pytest.raises(sources.SourceError, match=message):
    jax_pipeline.host_source("folder", root=root)


def test_all_transparent_and_all_opaque_alphas_are_documented_cases():
  rng = np.random.default_rng(0)
  fg = rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)
  bg = [rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)]
  transparent = data_pipeline.ArraySource("clear", [fg], [np.zeros((60, 70), np.uint8)], bg)
  for batch in _batches(transparent, 2, batch_size=2, crop_size=32):
    # No unknown pixel anywhere: the whole image resized to the crop, all background.
    assert np.all(batch["trimap"] == 0) and np.all(batch["alpha"] == 0)
    np.testing.assert_allclose(batch["image"], batch["bg"])
  opaque = data_pipeline.ArraySource("solid", [fg], [np.full((60, 70), 255, np.uint8)], bg)
  for batch in _batches(opaque, 2, batch_size=2, crop_size=32):
    # Only the affine's zero-filled borders can make unknown pixels; no crash either way.
    assert set(np.unique(batch["trimap"])) <= {0, 128, 255}
    assert set(np.unique(batch["alpha"])) <= {0.0, 1.0}


def test_crop_larger_than_every_image_is_enlarged(small_source):
  (batch,) = _batches(small_source, 1, batch_size=2, crop_size=256)
  assert batch["image"].shape == (2, 256, 256, 3)
  assert np.any(batch["trimap"] == 128)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"batch_size": 2, "crop_size": 50}, "crop_size must be a multiple of 16"),
    ({"batch_size": 2, "shard_index": 2, "num_shards": 2}, "shard_index must be in"),
])
def test_bad_arguments_are_named(small_source, kwargs, message):
  with pytest.raises(ValueError, match=message):
    data_pipeline.train_dataset(small_source, **kwargs)


def test_unknown_source_name():
  with pytest.raises(ValueError, match="unknown source 'coco'; expected one of synthetic"):
    data_pipeline.build_source("coco")


# ------------------------------------------------------------- dataset layouts


def test_adobe_layout(tmp_path):
  rng = np.random.default_rng(0)
  train = tmp_path / "Combined_Dataset" / "Training_set"
  for group, name in (("Adobe-licensed images", "a.jpg"), ("Other", "b.png")):
    fg, alpha = _soft_disc(rng, 64, 72)
    _save(train / group / "fg" / name, fg)
    _save(train / group / "alpha" / name, alpha)
  (train / "training_fg_names.txt").write_text("a.jpg\nb.png\n")
  coco = tmp_path / "coco"
  for i in range(3):
    _save(coco / f"{i}.jpg", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
  source = data_pipeline.build_source("adobe", root=tmp_path / "Combined_Dataset",
                                      background_dir=coco, backgrounds_per_foreground=2)
  assert (source.num_foregrounds, source.num_backgrounds, source.epoch_length) == (2, 3, 4)
  assert source.foreground_paths[1].endswith("Other/fg/b.png")
  (train / "training_bg_names.txt").write_text("0.jpg\nmissing.jpg\n")
  with pytest.raises(sources.SourceError, match="1 background files do not exist"):
    data_pipeline.build_source("adobe", root=tmp_path / "Combined_Dataset",
                               background_dir=coco)


def test_d646_layout(tmp_path):
  rng = np.random.default_rng(0)
  fg, alpha = _soft_disc(rng, 64, 72)
  _save(tmp_path / "D646" / "Train" / "FG" / "x.png", fg)
  _save(tmp_path / "D646" / "Train" / "GT" / "x.png", alpha)
  _save(tmp_path / "voc" / "v.jpg", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
  source = data_pipeline.build_source("d646", root=tmp_path / "D646",
                                      background_dir=tmp_path / "voc")
  assert source.epoch_length == 100
  with pytest.raises(FileNotFoundError, match="d646 root"):
    data_pipeline.build_source("d646", root=tmp_path / "nowhere",
                               background_dir=tmp_path / "voc")
