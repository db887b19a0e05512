"""The training sources, each declared once: which foreground, alpha and background images
a source names, with its options, checked before anything is decoded. No TensorFlow.

Both executors read these declarations: the tf.data one turns a `Catalog` into graph
readers (`data_pipeline.sources`), the JAX one into host readers
(`data_pipeline.jax_pipeline`). A new source is one function here, added to `SOURCES`.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import os
import pathlib
from typing import Any, Callable, NamedTuple, Sequence

from PIL import Image

from data_pipeline import synthetic as synthetic_images
from data_pipeline.files import IMAGE_EXTENSIONS, SourceError, require_dir

# PIL modes the decoder turns into what the protocol needs without guessing.
FOREGROUND_MODES = ("RGB", "L", "P")
ALPHA_MODES = ("L", "1", "I;16", "I", "RGB")  # RGB: a grey alpha saved as RGB.
# Threads reading headers at start-up (I/O bound: tens of thousands of files take seconds).
_HEADER_THREADS = 16


class Catalog(NamedTuple):
  """A training source's images: foreground/alpha pairs (index-aligned) and backgrounds.

  Each item is a file path (str); for the synthetic source a uint8 array (foregrounds and
  backgrounds (h, w, 3) RGB, alphas (h, w)); for the TFDS source's foregrounds and alphas
  an index into `records` (dicts with the encoded "foreground" and "alpha").
  """
  name: str
  foregrounds: Sequence
  alphas: Sequence
  backgrounds: Sequence
  backgrounds_per_foreground: int
  records: Any = None


# ------------------------------------------------------------------ the sources


def synthetic(num_foregrounds: int = 8, num_backgrounds: int = 16, min_size: int = 320,
              max_size: int = 640, seed: int = 0, backgrounds_per_foreground: int = 4
              ) -> Catalog:
  """Seeded synthetic foregrounds (hair, veils, holes) and backgrounds, made in memory
  (`data_pipeline.synthetic`); sides drawn from [min_size, max_size]."""
  foregrounds, alphas, backgrounds = synthetic_images.synthetic_dataset(
      num_foregrounds, num_backgrounds, min_size, max_size, seed)
  return Catalog(f"synthetic(seed={seed})", foregrounds, alphas, backgrounds,
                 backgrounds_per_foreground)


def folder(root: str | os.PathLike | None = None, *, fg_dir=None, alpha_dir=None,
           bg_dir=None, backgrounds_per_foreground: int = 1) -> Catalog:
  """fg/, alpha/ and bg/ folders (under `root`, or given one by one); fg and alpha paired
  by file stem."""
  if root is None and None in (fg_dir, alpha_dir, bg_dir):
    raise ValueError("folder source: give root=DIR (with fg/, alpha/, bg/) or all of "
                     "fg_dir, alpha_dir and bg_dir")
  fg_dir = require_dir(fg_dir or pathlib.Path(root) / "fg", "fg_dir")
  alpha_dir = require_dir(alpha_dir or pathlib.Path(root) / "alpha", "alpha_dir")
  bg_dir = require_dir(bg_dir or pathlib.Path(root) / "bg", "bg_dir")
  foregrounds, alphas = _pair_by_stem(fg_dir, alpha_dir)
  return _checked(Catalog(f"folder({fg_dir.parent})", foregrounds, alphas,
                          [str(p) for p in images_in(bg_dir)], backgrounds_per_foreground))


def adobe(root: str | os.PathLike, background_dir: str | os.PathLike, *,
          backgrounds_per_foreground: int = 100) -> Catalog:
  """The Deep Image Matting (Composition-1k) training set.

  Args:
    root: the released `Combined_Dataset` folder. Its `Training_set/training_fg_names.txt`
      lists the 431 foregrounds, found in `Training_set/Adobe-licensed images/{fg,alpha}`
      or `Training_set/Other/{fg,alpha}`.
    background_dir: the MS-COCO images; when `Training_set/training_bg_names.txt` exists the
      listed files are used (all must be present), otherwise every image in the folder.
    backgrounds_per_foreground: 100 in the protocol (an epoch of 43,100 composites).
  """
  root = require_dir(root, "adobe root (Combined_Dataset)")
  train = require_dir(root / "Training_set", "adobe root")
  names_file = train / "training_fg_names.txt"
  if not names_file.is_file():
    raise FileNotFoundError(f"adobe: {names_file} not found; root must be the released "
                            f"Combined_Dataset folder")
  groups = [train / "Adobe-licensed images", train / "Other"]
  foregrounds, alphas = [], []
  for name in _read_name_list(names_file):
    for group in groups:
      if (group / "fg" / name).is_file():
        foregrounds.append(str(group / "fg" / name))
        alphas.append(str(group / "alpha" / name))
        break
    else:
      raise SourceError(f"adobe: foreground {name} (listed in {names_file}) is in none of "
                        f"{', '.join(str(g / 'fg') for g in groups)}")
  background_dir = require_dir(background_dir, "background_dir")
  bg_names_file = train / "training_bg_names.txt"
  if bg_names_file.is_file():
    backgrounds = [str(background_dir / name) for name in _read_name_list(bg_names_file)]
  else:
    backgrounds = [str(p) for p in images_in(background_dir)]
  return _checked(Catalog(f"adobe({root})", foregrounds, alphas, backgrounds,
                          backgrounds_per_foreground))


def d646(root: str | os.PathLike, background_dir: str | os.PathLike, *,
         backgrounds_per_foreground: int = 100) -> Catalog:
  """Distinctions-646 training set: `root/Train/FG` and `root/Train/GT` (alpha), paired by
  name, composited on the images of `background_dir` (MS-COCO in the protocol)."""
  root = require_dir(root, "d646 root")
  foregrounds, alphas = _pair_by_stem(require_dir(root / "Train" / "FG", "d646 root"),
                                      require_dir(root / "Train" / "GT", "d646 root"))
  background_dir = require_dir(background_dir, "background_dir")
  return _checked(Catalog(f"d646({root})", foregrounds, alphas,
                          [str(p) for p in images_in(background_dir)],
                          backgrounds_per_foreground))


def tfds(dataset: str, data_dir: str | os.PathLike, background_dir: str | os.PathLike, *,
         backgrounds_per_foreground: int = 100) -> Catalog:
  """Training foregrounds of a prepared TFDS matting set (`dataset`: 'composition1k' or
  'distinctions646', config 'foregrounds' of `data_pipeline.tfds_builders`; needs
  tensorflow-datasets, not TensorFlow) on the images of `background_dir`."""
  records = _tfds_foreground_records(dataset, data_dir)
  background_dir = require_dir(background_dir, "background_dir")
  backgrounds = [str(p) for p in images_in(background_dir)]
  if not backgrounds:
    raise SourceError(f"no backgrounds found in {background_dir}")
  _check_backgrounds(backgrounds)
  indices = range(len(records))
  return Catalog(f"tfds({dataset})", indices, indices, backgrounds,
                 backgrounds_per_foreground, records)


SOURCES: dict[str, Callable[..., Catalog]] = {
    "synthetic": synthetic, "adobe": adobe, "d646": d646, "folder": folder, "tfds": tfds}


def declaration(name: str) -> Callable[..., Catalog]:
  """The function declaring source `name` (a key of `SOURCES`): called with its options,
  it gives the source's checked `Catalog`."""
  if name not in SOURCES:
    raise ValueError(f"unknown source {name!r}; expected one of {', '.join(SOURCES)}")
  return SOURCES[name]


def options(name: str) -> list[str]:
  """The option names source `name` takes."""
  return list(inspect.signature(declaration(name)).parameters)


# ------------------------------------------------------------------ checks


def _checked(catalog: Catalog) -> Catalog:
  """`catalog`, or SourceError naming the file unless every pair and background can be
  used (headers only: start-up stays fast for tens of thousands of files)."""
  name, foregrounds, alphas, backgrounds = catalog[:4]
  if not foregrounds:
    raise SourceError(f"{name}: no foregrounds found")
  if not backgrounds:
    raise SourceError(f"{name}: no backgrounds found")
  if len(foregrounds) != len(alphas):
    raise SourceError(f"{name}: {len(foregrounds)} foregrounds but {len(alphas)} alphas")
  _check_pairs(foregrounds, alphas)
  missing = [path for path in backgrounds if not os.path.isfile(path)]
  if missing:
    raise SourceError(f"{name}: {len(missing)} background files do not exist, e.g. "
                      f"{missing[0]}")
  _check_backgrounds(backgrounds)
  return catalog


def find_unreadable(paths: Sequence[str]) -> list[str]:
  """Fully decodes every file; returns 'path: reason' for each one that fails."""
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
    return [error for error in pool.map(_full_decode_error, paths) if error]


def _header(path: str) -> tuple[tuple[int, int], str]:
  """(width, height), mode from the file header, with an error that names the file."""
  try:
    with Image.open(path) as image:
      return image.size, image.mode
  except FileNotFoundError:
    raise SourceError(f"{path}: file not found") from None
  except (OSError, SyntaxError, ValueError) as error:
    raise SourceError(f"{path}: not a readable image ({error})") from None


def _full_decode_error(path: str) -> str | None:
  try:
    with Image.open(path) as image:
      image.load()
  except Exception as error:  # Any failure to decode is what we report.
    return f"{path}: {error}"
  return None


def _headers(paths: Sequence[str]) -> list[tuple[tuple[int, int], str]]:
  with concurrent.futures.ThreadPoolExecutor(_HEADER_THREADS) as pool:
    return list(pool.map(_header, paths))


def _check_pairs(foregrounds: Sequence[str], alphas: Sequence[str]) -> None:
  """Header checks of every foreground/alpha pair."""
  for fg_path, alpha_path, (fg_size, fg_mode), (alpha_size, alpha_mode) in zip(
      foregrounds, alphas, _headers(foregrounds), _headers(alphas)):
    if fg_mode in ("RGBA", "LA", "PA"):
      raise SourceError(
          f"{fg_path}: foreground has an alpha channel ({fg_mode}); this source takes alpha "
          f"from {alpha_path}. Save the foreground as RGB so it is not ambiguous which "
          f"alpha is meant.")
    if fg_mode not in FOREGROUND_MODES:
      raise SourceError(f"{fg_path}: foreground mode {fg_mode} is not supported "
                        f"(expected one of {', '.join(FOREGROUND_MODES)})")
    if alpha_mode not in ALPHA_MODES:
      raise SourceError(f"{alpha_path}: alpha mode {alpha_mode} is not supported (expected "
                        f"a single-channel image, or a grey one saved as RGB)")
    if fg_size != alpha_size:
      raise SourceError(f"size mismatch: foreground {fg_path} is {fg_size[0]}x{fg_size[1]} "
                        f"but its alpha {alpha_path} is {alpha_size[0]}x{alpha_size[1]}")


def _check_backgrounds(backgrounds: Sequence[str]) -> None:
  """SourceError naming the first background whose header is not an image's (a text or
  HTML file saved as .jpg), found here rather than when it is first drawn, hours into a
  run. Headers only: a file cut short after its header is found when it is decoded."""
  _headers(backgrounds)


# ------------------------------------------------------------------ layouts


def images_in(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _pair_by_stem(fg_dir: pathlib.Path, alpha_dir: pathlib.Path
                  ) -> tuple[list[str], list[str]]:
  foregrounds = {p.stem: p for p in images_in(fg_dir)}
  alphas = {p.stem: p for p in images_in(alpha_dir)}
  lonely_fg = sorted(set(foregrounds) - set(alphas))
  lonely_alpha = sorted(set(alphas) - set(foregrounds))
  if lonely_fg:
    raise SourceError(f"{len(lonely_fg)} foregrounds in {fg_dir} have no alpha with the same "
                      f"name in {alpha_dir}: {', '.join(lonely_fg[:5])}")
  if lonely_alpha:
    raise SourceError(f"{len(lonely_alpha)} alphas in {alpha_dir} have no foreground with "
                      f"the same name in {fg_dir}: {', '.join(lonely_alpha[:5])}")
  stems = sorted(foregrounds)
  return [str(foregrounds[s]) for s in stems], [str(alphas[s]) for s in stems]


def _read_name_list(path: pathlib.Path) -> list[str]:
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _tfds_foreground_records(dataset: str, data_dir: str | os.PathLike):
  """The training records of a prepared TFDS matting set, by index."""
  import tensorflow_datasets

  from data_pipeline import tfds_builders

  builder = tfds_builders.load_builder(dataset, str(data_dir), "foregrounds")
  if not builder.is_prepared():
    raise SourceError(f"{dataset}/foregrounds is not prepared in {data_dir}; run "
                      f"data_pipeline.tfds_builders.prepare({dataset!r}, MANUAL_DIR, "
                      f"{str(data_dir)!r}, config='foregrounds')")
  skip = tensorflow_datasets.decode.SkipDecoding()
  records = builder.as_data_source(split="train",
                                   decoders={"foreground": skip, "alpha": skip})
  if not len(records):
    raise SourceError(f"{dataset}/foregrounds in {data_dir} has no examples")
  return records
