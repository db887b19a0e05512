"""The file lists of the training sources, without TensorFlow: which foreground, alpha and
background files a source names, checked before anything is decoded.

Both training pipelines build on these lists: the tf.data one (`data_pipeline.sources`) and
the JAX one (`data_pipeline.jax_pipeline`).
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
from typing import NamedTuple, Sequence

from PIL import Image

from data_pipeline.files import IMAGE_EXTENSIONS, SourceError, require_dir

# PIL modes the decoder turns into what the protocol needs without guessing.
FOREGROUND_MODES = ("RGB", "L", "P")
ALPHA_MODES = ("L", "1", "I;16", "I", "RGB")  # RGB: a grey alpha saved as RGB.


class FileLists(NamedTuple):
  """A source's files: foreground/alpha pairs (index-aligned) and backgrounds."""
  name: str
  foregrounds: list[str]
  alphas: list[str]
  backgrounds: list[str]
  backgrounds_per_foreground: int


def check(name: str, foregrounds: Sequence[str], alphas: Sequence[str],
          backgrounds: Sequence[str]) -> None:
  """SourceError naming the file unless every pair and background can be used."""
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


def _check_pairs(foregrounds: Sequence[str], alphas: Sequence[str]) -> None:
  """Header checks of every foreground/alpha pair (parallel: headers are I/O bound)."""
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    fg_headers = list(pool.map(_header, foregrounds))
    alpha_headers = list(pool.map(_header, alphas))
  for fg_path, alpha_path, (fg_size, fg_mode), (alpha_size, alpha_mode) in zip(
      foregrounds, alphas, fg_headers, alpha_headers):
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


def folder_lists(root: str | os.PathLike | None = None, *, fg_dir=None, alpha_dir=None,
                  bg_dir=None, backgrounds_per_foreground: int = 1) -> FileLists:
  """fg/, alpha/ and bg/ folders (under `root`, or given one by one); fg and alpha paired
  by file stem."""
  if root is None and None in (fg_dir, alpha_dir, bg_dir):
    raise ValueError("folder source: give root=DIR (with fg/, alpha/, bg/) or all of "
                     "fg_dir, alpha_dir and bg_dir")
  fg_dir = require_dir(fg_dir or pathlib.Path(root) / "fg", "fg_dir")
  alpha_dir = require_dir(alpha_dir or pathlib.Path(root) / "alpha", "alpha_dir")
  bg_dir = require_dir(bg_dir or pathlib.Path(root) / "bg", "bg_dir")
  foregrounds, alphas = _pair_by_stem(fg_dir, alpha_dir)
  backgrounds = [str(p) for p in images_in(bg_dir)]
  return FileLists(f"folder({fg_dir.parent})", foregrounds, alphas, backgrounds,
                   backgrounds_per_foreground)


def _read_name_list(path: pathlib.Path) -> list[str]:
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def adobe_lists(root: str | os.PathLike, background_dir: str | os.PathLike, *,
                 backgrounds_per_foreground: int = 100) -> FileLists:
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
  return FileLists(f"adobe({root})", foregrounds, alphas, backgrounds,
                   backgrounds_per_foreground)


def d646_lists(root: str | os.PathLike, background_dir: str | os.PathLike, *,
                backgrounds_per_foreground: int = 100) -> FileLists:
  """Distinctions-646 training set: `root/Train/FG` and `root/Train/GT` (alpha), paired by
  name, composited on the images of `background_dir` (MS-COCO in the protocol)."""
  root = require_dir(root, "d646 root")
  foregrounds, alphas = _pair_by_stem(require_dir(root / "Train" / "FG", "d646 root"),
                                      require_dir(root / "Train" / "GT", "d646 root"))
  background_dir = require_dir(background_dir, "background_dir")
  return FileLists(f"d646({root})", foregrounds, alphas,
                   [str(p) for p in images_in(background_dir)], backgrounds_per_foreground)


def background_paths(background_dir: str | os.PathLike) -> list[str]:
  """The images of a background folder (SourceError if there are none)."""
  background_dir = require_dir(background_dir, "background_dir")
  paths = [str(p) for p in images_in(background_dir)]
  if not paths:
    raise SourceError(f"no backgrounds found in {background_dir}")
  return paths


def tfds_foreground_records(dataset: str, data_dir: str | os.PathLike):
  """The training records of a prepared TFDS matting set (`data_pipeline.tfds_builders`,
  config 'foregrounds'), by index: dicts with the encoded "foreground" and "alpha"."""
  import tensorflow_datasets as tfds

  from data_pipeline import tfds_builders

  builder = tfds_builders.load_builder(dataset, str(data_dir), "foregrounds")
  if not builder.is_prepared():
    raise SourceError(f"{dataset}/foregrounds is not prepared in {data_dir}; run "
                      f"data_pipeline.tfds_builders.prepare({dataset!r}, MANUAL_DIR, "
                      f"{str(data_dir)!r}, config='foregrounds')")
  skip = tfds.decode.SkipDecoding()
  records = builder.as_data_source(split="train",
                                   decoders={"foreground": skip, "alpha": skip})
  if not len(records):
    raise SourceError(f"{dataset}/foregrounds in {data_dir} has no examples")
  return records
