"""Evaluation sets at full resolution: image + trimap (+ alpha), fixed order, shape buckets.

The authors evaluate each image whole: the normalised input is reflect-padded at the bottom
and right to a multiple of the network stride (16) and the prediction is cropped back.
`eval_batches` does the same padding and groups images by padded shape, so a jitted model
compiles once per bucket rather than once per image; the last batch of a bucket is filled
with copies flagged `valid=False` so every batch has the same size.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from data_pipeline import files
from data_pipeline.files import IMAGE_EXTENSIONS, NETWORK_STRIDE, SourceError
from data_pipeline.files import require_dir as _require_dir

TRIMAP_VALUES = (0, 128, 255)


@dataclasses.dataclass(frozen=True)
class EvalItem:
  """One evaluation image. `load()` returns image (H, W, 3) uint8 RGB, trimap (H, W) uint8
  and alpha (H, W) uint8 or None."""
  name: str
  height: int
  width: int
  load: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray | None]]


def _read(path: str, kind: str) -> np.ndarray:
  return files.read_image(path, kind)[0]


def _size(path: str) -> tuple[int, int]:
  try:
    return files.upright_size(path)  # the size `_read` gives, EXIF orientation applied
  except Exception as error:
    raise SourceError(f"{path}: not a readable image ({error})") from None


def check_trimap(trimap: np.ndarray, where: str) -> None:
  """Raises unless every trimap value is 0, 128 or 255."""
  unexpected = np.setdiff1d(np.unique(trimap), TRIMAP_VALUES)
  if unexpected.size:
    raise SourceError(f"{where}: trimap has values {unexpected[:8].tolist()} besides "
                      f"0/128/255")


def file_item(name: str, image: str, trimap: str, alpha: str | None = None) -> EvalItem:
  """An item read from files; sizes are checked from the headers now, values on load."""
  height, width = _size(image)
  for other in (trimap, alpha):
    if other is not None and _size(other) != (height, width):
      other_height, other_width = _size(other)
      raise SourceError(f"size mismatch: {image} is {width}x{height} but {other} is "
                        f"{other_width}x{other_height}")

  def load():
    trimap_array = _read(trimap, "grey")
    check_trimap(trimap_array, trimap)
    return (_read(image, "rgb"), trimap_array,
            None if alpha is None else _read(alpha, "alpha"))

  return EvalItem(name, height, width, load)


def array_item(name: str, image: np.ndarray, trimap: np.ndarray,
               alpha: np.ndarray | None = None) -> EvalItem:
  """An item held in memory (uint8 arrays: image (H, W, 3), trimap and alpha (H, W))."""
  check_trimap(trimap, name)
  return EvalItem(name, image.shape[0], image.shape[1], lambda: (image, trimap, alpha))


def folder_items(root: str | os.PathLike | None = None, *, image_dir=None, trimap_dir=None,
                 alpha_dir=None) -> list[EvalItem]:
  """image/, trimap/ and (optional) alpha/ folders matched by file stem, sorted by name."""
  root = None if root is None else pathlib.Path(root)
  image_dir = _require_dir(image_dir or root / "image", "image_dir")
  trimap_dir = _require_dir(trimap_dir or root / "trimap", "trimap_dir")
  if alpha_dir is None and root is not None and (root / "alpha").is_dir():
    alpha_dir = root / "alpha"

  def by_stem(folder):
    found = {}
    for p in sorted(pathlib.Path(folder).iterdir()):
      if p.suffix.lower() not in IMAGE_EXTENSIONS:
        continue
      if p.stem in found:  # which one is meant would depend on directory order
        raise SourceError(f"{folder}: {pathlib.Path(found[p.stem]).name} and {p.name} share "
                          f"the name {p.stem!r}; rename or move all but one")
      found[p.stem] = str(p)
    return found

  images, trimaps = by_stem(image_dir), by_stem(trimap_dir)
  alphas = by_stem(_require_dir(alpha_dir, "alpha_dir")) if alpha_dir else {}
  if not images:
    raise SourceError(f"no images in {image_dir}")
  missing = sorted(set(images) - set(trimaps))
  if missing:
    raise SourceError(f"{len(missing)} images in {image_dir} have no trimap in {trimap_dir}: "
                      f"{', '.join(missing[:5])}")
  # Images without an alpha are predicted but not scored (the evaluation lists them).
  return [file_item(stem, images[stem], trimaps[stem], alphas.get(stem))
          for stem in sorted(images)]


def alphamatting_items(root: str | os.PathLike, trimap: str = "trimap") -> list[EvalItem]:
  """The alphamatting.com training layout in one folder: image_XX, trimap_XX (or another
  trimap prefix such as 'trimap2'), alpha_XX."""
  root = _require_dir(root, "alphamatting root")
  images = sorted(root.glob("image_*.png"))
  if not images:
    raise SourceError(f"no image_*.png files in {root}")
  items = []
  for image in images:
    number = image.stem.split("_", 1)[1]
    alpha = root / f"alpha_{number}.png"
    items.append(file_item(image.stem, str(image), str(root / f"{trimap}_{number}.png"),
                           str(alpha) if alpha.exists() else None))
  return items


def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
  return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def reflect_pad(array: np.ndarray, height: int, width: int) -> np.ndarray:
  """Reflect-pads the first two axes at the bottom/right to (height, width), as np.pad's
  'reflect' (edge not repeated), repeating the reflection for pads larger than the image."""
  pad = [(0, height - array.shape[0]), (0, width - array.shape[1])]
  pad += [(0, 0)] * (array.ndim - 2)
  return np.pad(array, pad, mode="reflect")


def eval_batches(items: Sequence[EvalItem], *, batch_size: int = 1,
                 multiple: int = NETWORK_STRIDE,
                 num_threads: int = 4, shard_index: int = 0, num_shards: int = 1
                 ) -> Iterator[dict]:
  """Padded evaluation batches, bucketed by padded shape, in a fixed order.

  Buckets come in order of first appearance; inside a bucket, items keep their order.
  With several shards (one per process of a multi-host run) each bucket is cut into
  global batches of batch_size * num_shards items and shard s takes the s-th slice of
  each: every shard yields the same sequence of shapes (so collective programs line up),
  the shards' valid images are disjoint and together they are the whole set.

  Each batch: `image` float32 (B, Hp, Wp, 3) in [0, 1]; `trimap` uint8 (B, Hp, Wp, 1);
  `alpha` uint8 (B, Hp, Wp, 1) (zeros where `has_alpha`, bool (B,), is False); `height`, `width` int32 (B,)
  the original sizes (crop the prediction to [:height, :width]); `valid` bool (B,) (False
  for the copies that fill the last batch of a bucket); `name` list of str.

  Args:
    items: from `folder_items`, `alphamatting_items`, `tfds_items`, `synthetic_items`.
    batch_size: images per batch (per host; a multiple of the device count for pmap).
    shard_index, num_shards: this process's share (`jax.process_index()`,
      `jax.process_count()` in a multi-host run).
    multiple: the padding multiple; 16 is the authors' rule (the network's stride). A
      larger multiple means fewer buckets (fewer compilations) but more border context
      than the authors' evaluation had.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index must be in [0, num_shards={num_shards}), got {shard_index}")
  if multiple < 1 or multiple % NETWORK_STRIDE:
    raise ValueError(f"multiple must be a positive multiple of {NETWORK_STRIDE}, got {multiple}")
  buckets: dict[tuple[int, int], list[EvalItem]] = {}
  for item in items:
    buckets.setdefault(padded_size(item.height, item.width, multiple), []).append(item)

  def prepare(item: EvalItem, shape: tuple[int, int]):
    image, trimap, alpha = item.load()
    if image.shape[:2] != (item.height, item.width) or trimap.shape != image.shape[:2]:
      raise SourceError(f"{item.name}: image {image.shape[:2]} and trimap {trimap.shape} "
                        f"do not have the announced size {(item.height, item.width)}")
    has_alpha = alpha is not None
    if not has_alpha:
      alpha = np.zeros_like(trimap)
    elif alpha.shape != trimap.shape:
      raise SourceError(f"{item.name}: alpha {alpha.shape} and trimap {trimap.shape} differ")
    return (reflect_pad(image.astype(np.float32) / 255.0, *shape),
            reflect_pad(trimap, *shape)[..., None], reflect_pad(alpha, *shape)[..., None],
            has_alpha)

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    global_batch = batch_size * num_shards
    for shape, bucket in buckets.items():
      for start in range(0, len(bucket), global_batch):
        everyone = bucket[start:start + global_batch]
        chunk = everyone[shard_index * batch_size:(shard_index + 1) * batch_size]
        valid = [True] * len(chunk) + [False] * (batch_size - len(chunk))
        chunk = chunk + [(chunk or everyone)[-1]] * (batch_size - len(chunk))
        arrays = list(pool.map(lambda item: prepare(item, shape), chunk))
        yield {
            "image": np.stack([a[0] for a in arrays]),
            "trimap": np.stack([a[1] for a in arrays]),
            "alpha": np.stack([a[2] for a in arrays]),
            "has_alpha": np.array([a[3] for a in arrays]),
            "height": np.array([item.height for item in chunk], np.int32),
            "width": np.array([item.width for item in chunk], np.int32),
            "valid": np.array(valid),
            "name": [item.name for item in chunk],
        }


def num_buckets(items: Iterable[EvalItem], multiple: int = NETWORK_STRIDE) -> int:
  """How many distinct padded shapes (compilations) `eval_batches` will produce."""
  return len({padded_size(item.height, item.width, multiple) for item in items})


def tfds_items(name: str, data_dir: str, split: str = "test") -> list[EvalItem]:
  """A prepared TFDS test set ('composition1k', 'distinctions646'), sorted by name.

  Prepare it first with `data_pipeline.tfds_builders.prepare` (array_record format).
  """
  import io

  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ImportError(f"the TFDS test set {name!r} needs TensorFlow Datasets, which the "
                      f"core install leaves out: pip install 'a2u-jax[train]'") from None

  from data_pipeline import tfds_builders

  builder = tfds_builders.load_builder(name, data_dir, "test")
  if not builder.is_prepared():
    raise SourceError(f"{name} is not prepared in {data_dir}; run "
                      f"data_pipeline.tfds_builders.prepare({name!r}, MANUAL_DIR, {data_dir!r})")
  skip = tfds.decode.SkipDecoding()
  records = builder.as_data_source(split=split,
                                   decoders={"image": skip, "alpha": skip, "trimap": skip})

  def decode(encoded: bytes, mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(encoded)) as image:
      return np.asarray(image.convert(mode))

  def loader(index: int):
    def load():
      record = records[index]
      return (decode(record["image"], "RGB"), decode(record["trimap"], "L"),
              decode(record["alpha"], "L"))
    return load

  items = []
  for index in range(len(records)):
    record = records[index]
    items.append(EvalItem(record["name"].decode() if isinstance(record["name"], bytes)
                          else str(record["name"]), int(record["height"]),
                          int(record["width"]), loader(index)))
  return sorted(items, key=lambda item: item.name)


def synthetic_items(count: int = 8, min_size: int = 160, max_size: int = 320,
                    seed: int = 1) -> list[EvalItem]:
  """Held-out synthetic composites with protocol trimaps (seeded, in memory).

  The default seed differs from the synthetic training source's default, so the images
  are not the training foregrounds.
  """
  from data_pipeline import synthetic, trimaps

  rng = np.random.default_rng(seed)
  items = []
  for index in range(count):
    height, width = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
    fg, alpha = synthetic.synthetic_foreground(rng, height, width)
    bg = synthetic.synthetic_background(rng, height, width)
    a = alpha.astype(np.float32)[..., None] / 255.0
    image = np.round(fg * a + bg * (1 - a)).astype(np.uint8)
    fg_size, bg_size = (int(rng.integers(5, 16)) for _ in range(2))
    trimap = trimaps.trimap_from_alpha(alpha, fg_size, bg_size)
    items.append(array_item(f"synthetic_{index:03d}", image, trimap, alpha))
  return items
