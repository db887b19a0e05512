"""Evaluation loading (padding, buckets, order, errors) and the TFDS builders."""

import numpy as np
import pytest
from PIL import Image

import data_pipeline
from data_pipeline import evaluation, sources, tfds_builders

from tests.conftest import SHARED


@pytest.fixture(scope="module")
def photos():
  root = SHARED / "data" / "alphamatting_lowres"
  if not root.is_dir():
    pytest.skip(f"needs {root} (real photos from the project's shared data)")
  return root


def test_eval_batches_on_real_photos_pad_by_reflection_and_remember_the_crop(photos):
  items = evaluation.alphamatting_items(photos, trimap="trimap2")
  assert len(items) == 13 and items[0].name == "image_01"
  batches = list(evaluation.eval_batches(items, batch_size=2))
  seen = []
  for batch in batches:
    b, height, width, _ = batch["image"].shape
    assert height % 16 == 0 and width % 16 == 0 and b == 2
    for i in range(b):
      h, w = int(batch["height"][i]), int(batch["width"][i])
      assert height - 16 < h <= height and width - 16 < w <= width
      if not batch["valid"][i]:
        continue
      name = batch["name"][i]
      seen.append(name)
      number = name.split("_")[1]
      image = np.asarray(Image.open(photos / f"image_{number}.png").convert("RGB"))
      trimap = np.asarray(Image.open(photos / f"trimap2_{number}.png"))
      np.testing.assert_array_equal(batch["trimap"][i, :h, :w, 0], trimap)
      expected = np.pad(image, ((0, height - h), (0, width - w), (0, 0)), mode="reflect")
      np.testing.assert_allclose(batch["image"][i], expected / 255.0, atol=1e-7)
      alpha = np.asarray(Image.open(photos / f"alpha_{number}.png"))
      np.testing.assert_array_equal(batch["alpha"][i, :h, :w, 0], alpha)
  # Every image exactly once; buckets in first-appearance order, items in order inside.
  assert sorted(seen) == [item.name for item in items]
  assert len(batches) == sum(-(-n // 2) for n in _bucket_sizes(items))


def _bucket_sizes(items):
  sizes = {}
  for item in items:
    key = evaluation.padded_size(item.height, item.width, 16)
    sizes[key] = sizes.get(key, 0) + 1
  return list(sizes.values())


def test_coarser_buckets_mean_fewer_compilations(photos):
  items = evaluation.alphamatting_items(photos)
  assert evaluation.num_buckets(items, 128) < evaluation.num_buckets(items, 16)
  for batch in evaluation.eval_batches(items, batch_size=4, multiple=128):
    assert batch["image"].shape[1] % 128 == 0 and batch["image"].shape[2] % 128 == 0


def test_last_batch_of_a_bucket_is_filled_with_masked_copies():
  rng = np.random.default_rng(0)
  items = [evaluation.array_item(f"x{i}", rng.integers(0, 256, (20, 30, 3), np.uint8),
                                 np.full((20, 30), 128, np.uint8)) for i in range(3)]
  batches = list(evaluation.eval_batches(items, batch_size=2))
  assert [b["valid"].tolist() for b in batches] == [[True, True], [True, False]]
  assert batches[0]["image"].shape == (2, 32, 32, 3)
  assert batches[1]["name"] == ["x2", "x2"]


def test_folder_items_and_their_errors(tmp_path):
  rng = np.random.default_rng(0)
  for folder in ("image", "trimap", "alpha"):
    (tmp_path / folder).mkdir()
  Image.fromarray(rng.integers(0, 256, (20, 30, 3), np.uint8)).save(tmp_path / "image/a.png")
  Image.fromarray(np.full((20, 30), 128, np.uint8)).save(tmp_path / "trimap/a.png")
  Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "alpha/a.png")
  (item,) = evaluation.folder_items(tmp_path)
  assert (item.name, item.height, item.width) == ("a", 20, 30)

  Image.fromarray(np.full((20, 30), 100, np.uint8)).save(tmp_path / "trimap/a.png")
  with pytest.raises(sources.SourceError, match="trimap/a.png: trimap has values \\[100\\]"):
    evaluation.folder_items(tmp_path)[0].load()
  Image.fromarray(np.full((21, 30), 128, np.uint8)).save(tmp_path / "trimap/a.png")
  with pytest.raises(sources.SourceError, match="size mismatch: .*image/a.png is 30x20"):
    evaluation.folder_items(tmp_path)
  (tmp_path / "trimap/a.png").unlink()
  with pytest.raises(sources.SourceError, match="have no trimap"):
    evaluation.folder_items(tmp_path)
  with pytest.raises(FileNotFoundError, match="image_dir"):
    evaluation.folder_items(tmp_path / "nowhere")


def test_synthetic_items_are_valid_and_held_out():
  items = evaluation.synthetic_items(count=3, min_size=64, max_size=96)
  image, trimap, alpha = items[0].load()
  assert image.shape == (items[0].height, items[0].width, 3)
  assert set(np.unique(trimap)) <= {0, 128, 255} and 128 in trimap
  fractional = (alpha > 0) & (alpha < 255)
  assert np.all(trimap[fractional] == 128)


def test_compose_like_adobe_hand_cases():
  fg = Image.fromarray(np.array([[[200, 100, 50], [200, 100, 50], [200, 100, 50]]],
                                np.uint8))
  alpha = Image.fromarray(np.array([[0, 255, 128]], np.uint8))
  bg = Image.fromarray(np.array([[[10, 20, 30], [10, 20, 30], [10, 20, 30]]], np.uint8))
  out = tfds_builders.compose_like_adobe(fg, alpha, bg)
  a = 128 / 255
  np.testing.assert_array_equal(out[0, 0], [10, 20, 30])
  np.testing.assert_array_equal(out[0, 1], [200, 100, 50])
  np.testing.assert_array_equal(out[0, 2], np.floor(a * np.array([200, 100, 50])
                                                    + (1 - a) * np.array([10, 20, 30])))
  # A smaller background is enlarged to cover the foreground, then cropped top-left.
  small_bg = Image.fromarray(np.full((1, 1, 3), 77, np.uint8))
  np.testing.assert_array_equal(tfds_builders.compose_like_adobe(fg, alpha, small_bg)[0, 0],
                                [77, 77, 77])


def _fake_release(root, rng):
  """A miniature Combined_Dataset + VOC layout."""
  test = root / "Combined_Dataset" / "Test_set"
  adobe = test / "Adobe-licensed images"
  voc = root / "VOCdevkit" / "VOC2012" / "JPEGImages"
  for folder in (adobe / "fg", adobe / "alpha", adobe / "trimaps", voc):
    folder.mkdir(parents=True)
  for i, (h, w) in enumerate(((40, 50), (48, 50))):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(adobe / "fg" / f"f{i}.png")
    Image.fromarray(rng.integers(0, 256, (h, w), np.uint8)).save(adobe / "alpha" / f"f{i}.png")
    Image.fromarray(np.full((h, w), 128, np.uint8)).save(adobe / "trimaps" / f"f{i}.png")
  for j in range(4):
    Image.fromarray(rng.integers(0, 256, (30, 35, 3), np.uint8)).save(voc / f"b{j}.jpg")
  (test / "test_fg_names.txt").write_text("f0.png\nf1.png\n")
  (test / "test_bg_names.txt").write_text("b0.jpg\nb1.jpg\nb2.jpg\nb3.jpg\n")
  train = root / "Combined_Dataset" / "Training_set"
  for i, group in enumerate(("Adobe-licensed images", "Other")):
    for folder in ("fg", "alpha"):
      (train / group / folder).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (60, 70, 3), np.uint8)).save(
        train / group / "fg" / f"t{i}.png")
    Image.fromarray(rng.integers(0, 256, (60, 70), np.uint8)).save(
        train / group / "alpha" / f"t{i}.png")
  (train / "training_fg_names.txt").write_text("t0.png\nt1.png\n")
  return voc


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_composition1k_tfds_builder_end_to_end(tmp_path):
  rng = np.random.default_rng(0)
  manual = tmp_path / "manual"
  voc = _fake_release(manual, rng)
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(sources.SourceError, match="is not prepared"):
    evaluation.tfds_items("composition1k", data_dir)
  tfds_builders.prepare("composition1k", str(manual), data_dir)
  items = evaluation.tfds_items("composition1k", data_dir)
  assert [item.name for item in items] == ["f0_0", "f0_1", "f1_0", "f1_1"]
  image, trimap, alpha = items[3].load()
  assert image.shape == (48, 50, 3) and trimap.shape == alpha.shape == (48, 50)
  adobe = manual / "Combined_Dataset" / "Test_set" / "Adobe-licensed images"
  with Image.open(adobe / "fg" / "f1.png") as fg, Image.open(adobe / "alpha" / "f1.png") as a, \
      Image.open(voc / "b3.jpg") as bg:
    np.testing.assert_array_equal(image, tfds_builders.compose_like_adobe(fg, a, bg))

  tfds_builders.prepare("composition1k", str(manual), data_dir, config="foregrounds")
  source = data_pipeline.build_source("tfds", dataset="composition1k", data_dir=data_dir,
                                      background_dir=voc, backgrounds_per_foreground=2)
  assert (source.num_foregrounds, source.epoch_length) == (2, 4)
  batch = next(data_pipeline.train_batches(source, batch_size=2, crop_size=32))
  assert batch["image"].shape == (2, 32, 32, 3)
  # The JAX pipeline reads the same records and makes the same examples.
  from data_pipeline import jax_pipeline
  host = jax_pipeline.host_source("tfds", dataset="composition1k", data_dir=data_dir,
                                  background_dir=voc, backgrounds_per_foreground=2)
  ours = next(jax_pipeline.JaxStream(host, batch_size=2, crop_size=32).batches())
  np.testing.assert_array_equal(np.asarray(ours["alpha"]), batch["alpha"])
  np.testing.assert_array_equal(np.asarray(ours["trimap"]), batch["trimap"])
