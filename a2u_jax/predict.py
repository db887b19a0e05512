"""Run a matting checkpoint on your own image + trimap.

  python -m a2u_jax.predict --checkpoint DIR --image photo.png --trimap trimap.png [--out DIR]
  python -m a2u_jax.predict --checkpoint DIR --image photos/ --trimap trimaps/ --out DIR
  python -m a2u_jax.predict --exported FILE --image photo.png --trimap trimap.png

--exported runs an artifact of a2u-export (`a2u_jax.export`) instead of a checkpoint.

Writes NAME_alpha.png (same size as the input; 8-bit, alpha * 255 truncated as the authors
save it, so it equals `a2u_jax.evaluate`'s output) and NAME_preview.png (input | trimap |
alpha | composite on a checkerboard). Trimap values must be 0, 128 or 255; with
--round-trimap other values are mapped to the nearest of the three (colour trimaps are
refused). Input files are never overwritten; in folder mode files of one name with two
extensions are refused, and a folder's own NAME_alpha.png / NAME_preview.png are not
inputs.

Memory: the network needs about BYTES_PER_PIXEL (1.4 kB) per input pixel, 2000x1500 about
4 GiB and 6000x4000 about 31 GiB. An image too large for the memory is refused before
compiling, with the figures; --max-side N predicts it with its longer side reduced to N
and upsamples the alpha back (bilinear; the full-size trimap's known regions restored), so
fine detail such as hair is coarser than at full size.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
from typing import Any, Callable, Collection, Sequence

import jax
import numpy as np
from PIL import Image

from a2u_jax import checkpointing, export, inputs, parallel
from data_pipeline import evaluation, files

TRIMAP_VALUES = np.array([0, 128, 255])
# A trimap whose R, G and B differ by more than this somewhere is a colour image (JPEG
# chroma noise in a grey trimap stays well below it).
COLOUR_SPREAD = 24
# Memory the eval-mode network needs per input pixel, measured with XLA's memory analysis
# of the compiled forward (A2U, float32: ~1.3 kB on CPU; 6000x4000 asks for ~31 GB). An
# estimate: other resamplers and platforms differ by tens of percent.
BYTES_PER_PIXEL = 1400
# What a run writes for an image NAME.EXT: NAME + each suffix.
OUTPUT_SUFFIXES = ("_alpha.png", "_preview.png")


@functools.lru_cache(maxsize=8)
def _sharded_forward(model, devices: tuple) -> tuple[Callable, list[int]]:
  """One jitted eval-mode forward per (model, devices), its output split over the
  devices, shared by every `Predictor` of that model (modules are hashable), with its
  trace counter."""
  traces = [0]

  def forward(variables, image, trimap):
    traces[0] += 1
    prediction = model.apply(variables, inputs.model_inputs(image, trimap), train=False)
    return inputs.postprocess_alpha(prediction, trimap)

  return jax.jit(forward, out_shardings=parallel.DataParallel(devices).split), traces


class Predictor:
  """Eval-mode alphas for padded batches, data-parallel over `devices`
  (`parallel.DataParallel`; default: the first local device).

  Call with image float32 (B, H, W, 3) in [0, 1] and trimap uint8 (B, H, W, 1), H and W
  multiples of 16, B a multiple of this process's devices among `devices`; returns the
  post-processed alphas (clipped, known trimap regions restored), float32 (B, H, W, 1), on
  the host. With devices of several processes (training's validation) every process calls
  it together with its own rows. Each input shape compiles once per model and device set;
  `compilations` counts them.
  """

  def __init__(self, model, variables: dict[str, Any],
               devices: Sequence[jax.Device] | None = None):
    self.runtime = parallel.DataParallel(devices or jax.local_devices()[:1])
    self.devices = self.runtime.devices
    self._forward, self._traces = _sharded_forward(model, self.devices)
    # Placed once, replicated (a training state already is: then nothing is copied).
    self.variables = self.runtime.put(variables)

  @property
  def compilations(self) -> int:
    return self._traces[0]

  @property
  def rows(self) -> int:
    """Images per call that fill this process's devices (a call takes multiples of it)."""
    return self.runtime.local_devices

  def __call__(self, image: np.ndarray, trimap: np.ndarray) -> np.ndarray:
    count = self.runtime.local_devices
    if image.shape[0] % count:
      raise ValueError(f"a batch of {image.shape[0]} does not split over {count} devices")
    batch = self.runtime.shard({"image": image, "trimap": trimap})
    return self.runtime.local_rows(self._forward(self.variables, batch["image"],
                                                 batch["trimap"]))


class ExportedPredictor:
  """`Predictor`'s call and result from an a2u-export artifact (`export.load_exported`),
  without the model code: image float32 (B, H, W, 3) in [0, 1] and trimap uint8
  (B, H, W, 1), H and W multiples of 16 -> float32 alphas (B, H, W, 1) on the host. It runs
  on JAX's default device (one of the platforms it was lowered for); each input shape
  compiles once. An artifact that cannot run here (damaged, from an incompatible JAX,
  lowered for other platforms) raises ValueError, in one line naming it, when opened."""

  rows = 1

  def __init__(self, path: str | pathlib.Path):
    self.exported, self.description = export.load_exported(path)
    platform = jax.export.default_export_platform()
    if platform not in self.exported.platforms:
      raise ValueError(f"{path}: lowered for {', '.join(self.exported.platforms)}, not for "
                       f"this machine's {platform}; export it again with --platforms "
                       f"{platform}")

  def __call__(self, image: np.ndarray, trimap: np.ndarray) -> np.ndarray:
    return np.asarray(self.exported.call(image, trimap))


def predict_alpha(predictor: Predictor | ExportedPredictor, image: np.ndarray,
                  trimap: np.ndarray) -> np.ndarray:
  """Alpha in [0, 1], (H, W) float32, by the authors' evaluation procedure.

  image: (H, W, 3) uint8 RGB; trimap: (H, W) uint8 in {0, 128, 255}. The input is
  reflect-padded at the bottom/right to a multiple of 16, the prediction cropped back,
  clipped to [0, 1], and the trimap's known regions restored.
  """
  height, width = trimap.shape
  padded_h, padded_w = evaluation.padded_size(height, width, files.NETWORK_STRIDE)
  pad = ((0, padded_h - height), (0, padded_w - width))
  image = np.pad(image.astype(np.float32) / 255.0, pad + ((0, 0),), mode="reflect")
  trimap = np.pad(trimap, pad, mode="reflect")[..., None]
  alpha = predictor(np.repeat(image[None], predictor.rows, 0),
                    np.repeat(trimap[None], predictor.rows, 0))
  return alpha[0, :height, :width, 0]


def available_memory(device: jax.Device | None = None) -> int | None:
  """Bytes the network may use on `device` (default: the first local one): an
  accelerator's memory limit, or the host's available memory for CPUs; None if unknown."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # not every backend has statistics
    stats = {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  try:  # MemAvailable counts the page cache the kernel would give back; free memory does not
    with open("/proc/meminfo") as meminfo:
      for line in meminfo:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def check_memory(path: pathlib.Path, height: int, width: int, rows: int = 1,
                 available: int | None = None) -> None:
  """Raises ValueError, with the figures, when predicting an image of this size would need
  more memory than there is (`BYTES_PER_PIXEL` of the padded input, times `rows`)."""
  padded_h, padded_w = evaluation.padded_size(height, width, files.NETWORK_STRIDE)
  needed = BYTES_PER_PIXEL * padded_h * padded_w * rows
  available = available_memory() if available is None else available
  if available is None or needed <= available:
    return
  side = int(max(height, width) * (available / needed) ** 0.5 * 0.9) // 16 * 16
  raise ValueError(f"{path}: {width}x{height} needs about {needed / 2**30:.1f} GiB for the "
                   f"network, more than the {available / 2**30:.1f} GiB available; pass "
                   f"--max-side {max(side, 16)} (or less) to predict at a reduced size and "
                   f"upsample the alpha")


def resized_for(image: np.ndarray, trimap: np.ndarray, max_side: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """The image (area-averaged) and trimap (nearest value, so still 0/128/255) scaled so
  that their longer side is `max_side`; unchanged if it already fits."""
  height, width = trimap.shape
  scale = max_side / max(height, width)
  if scale >= 1:
    return image, trimap
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
  small_trimap = np.asarray(Image.fromarray(trimap).resize(size, Image.Resampling.NEAREST))
  return small, small_trimap


def upsampled_alpha(alpha: np.ndarray, trimap: np.ndarray) -> np.ndarray:
  """A reduced-size alpha brought back to `trimap`'s size (bilinear), with the full-size
  trimap's known regions restored (0 where it is 0, 1 where it is 255)."""
  height, width = trimap.shape
  if alpha.shape == trimap.shape:
    return alpha
  full = np.asarray(Image.fromarray(alpha.astype(np.float32), "F").resize(
      (width, height), Image.Resampling.BILINEAR))
  full = np.clip(full, 0.0, 1.0)
  return np.where(trimap == 0, 0.0, np.where(trimap == 255, 1.0, full)).astype(np.float32)


def checkerboard(height: int, width: int, cell: int = 16) -> np.ndarray:
  yy, xx = np.mgrid[:height, :width]
  light = ((yy // cell + xx // cell) % 2).astype(np.float32)
  return np.repeat((0.6 + 0.3 * light)[..., None], 3, axis=-1)


def _grey(values: np.ndarray) -> np.ndarray:
  return np.repeat(values[..., None], 3, axis=-1)


def preview(image: np.ndarray, trimap: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """input | trimap | alpha | composite on a checkerboard, one uint8 RGB strip."""
  rgb = image.astype(np.float32) / 255.0
  a = alpha[..., None]
  composite = rgb * a + checkerboard(*alpha.shape) * (1.0 - a)
  panels = [rgb, _grey(trimap.astype(np.float32) / 255.0), _grey(alpha), composite]
  return np.round(np.concatenate(panels, axis=1) * 255.0).astype(np.uint8)


def read_pair(image_path: pathlib.Path, trimap_path: pathlib.Path, round_trimap: bool
              ) -> tuple[np.ndarray, np.ndarray, bool]:
  """Reads an image and its trimap, with errors that name the file: uint8 RGB (H, W, 3),
  uint8 trimap (H, W), and whether the image's alpha channel was dropped. 16-bit files
  are read at their depth and scaled to 8 bits (`data_pipeline.files.read_image`)."""
  image, dropped_alpha = files.read_image(image_path, "rgb")
  trimap, _ = files.read_image(trimap_path, "grey")
  colour, _ = files.read_image(trimap_path, "rgb")
  spread = colour.max(axis=-1).astype(np.int16) - colour.min(axis=-1)
  if spread.max(initial=0) > COLOUR_SPREAD:
    raise ValueError(f"{trimap_path}: a colour image (some pixels' R, G and B differ by up to "
                     f"{int(spread.max())}); a trimap is grey: 0 background, 128 unknown, 255 "
                     f"foreground. Convert a colour-coded trimap to those values first")
  if image.shape[:2] != trimap.shape:
    raise ValueError(f"{image_path} is {image.shape[1]}x{image.shape[0]} but its trimap "
                     f"{trimap_path} is {trimap.shape[1]}x{trimap.shape[0]}")
  unexpected = np.setdiff1d(np.unique(trimap), TRIMAP_VALUES)
  if unexpected.size:
    if not round_trimap:
      raise ValueError(f"{trimap_path}: trimap values must be 0, 128 or 255, found "
                       f"{unexpected[:8].tolist()}; pass --round-trimap to map each value to "
                       f"the nearest of the three")
    nearest = np.abs(trimap[..., None].astype(np.int16) - TRIMAP_VALUES).argmin(axis=-1)
    trimap = TRIMAP_VALUES[nearest].astype(np.uint8)
  return image, trimap, dropped_alpha


def _by_stem(folder: pathlib.Path, flag: str) -> dict[str, pathlib.Path]:
  """The image files of `folder` by stem; two files of one stem are refused by name."""
  found: dict[str, list[pathlib.Path]] = {}
  for path in sorted(folder.iterdir()):
    if path.suffix.lower() in files.IMAGE_EXTENSIONS and not path.name.startswith("."):
      found.setdefault(path.stem, []).append(path)
  for stem, paths in found.items():
    if len(paths) > 1:
      raise ValueError(f"{flag} {folder}: {' and '.join(p.name for p in paths)} share the "
                       f"name {stem!r}, so which one is meant is ambiguous (and both would "
                       f"write {stem}_alpha.png); rename or move all but one")
  return {stem: paths[0] for stem, paths in found.items()}


def _pairs(image: pathlib.Path, trimap: pathlib.Path) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """(image, trimap) files: the two given, or a folder's images paired with the trimap
  folder's files by stem. A folder's files that are a run's outputs for one of its images
  (NAME_alpha.png, NAME_preview.png beside NAME.*) are not inputs."""
  if image.is_dir() != trimap.is_dir():
    raise ValueError("--image and --trimap must both be files or both be folders")
  if not image.is_dir():
    return [(image, trimap)]
  images = _by_stem(image, "--image")
  outputs = {stem + suffix for stem in images for suffix in OUTPUT_SUFFIXES}
  images = {stem: path for stem, path in images.items() if path.name not in outputs}
  trimaps = _by_stem(trimap, "--trimap")
  pairs = []
  for stem, path in sorted(images.items()):
    if stem not in trimaps:
      raise ValueError(f"{path}: no trimap named {stem}.* in {trimap}")
    pairs.append((path, trimaps[stem]))
  if not pairs:
    raise ValueError(f"no images in {image}")
  return pairs


def write_png(path: pathlib.Path, array: np.ndarray,
              protected: Collection[pathlib.Path] = ()) -> None:
  """Writes a uint8 image through a temporary sibling and a rename, so the file never
  exists half-written; refuses to replace any (resolved) path in `protected`."""
  if path.resolve() in protected:
    raise ValueError(f"refusing to overwrite the input file {path}; choose another --out")
  staging = path.with_name(f".{path.name}.partial.png")
  try:
    Image.fromarray(array).save(staging)
    staging.replace(path)
  except BaseException:
    staging.unlink(missing_ok=True)  # a full disk leaves no partial file behind
    raise


def path_argument(text: str) -> pathlib.Path:
  """argparse type for file and folder options: an empty value (`--out=`) would mean the
  current folder, silently; it is refused."""
  if not text.strip():
    raise argparse.ArgumentTypeError("is empty; name a file or folder")
  return pathlib.Path(text)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  model = parser.add_mutually_exclusive_group(required=True)
  model.add_argument("--checkpoint", type=pathlib.Path,
                     help="model checkpoint folder (train.py's WORKDIR/model, or "
                          "python -m a2u_jax.convert's output)")
  model.add_argument("--exported", type=pathlib.Path,
                     help="an artifact of a2u-export (FILE, with FILE.json beside it), run "
                          "without the model code")
  parser.add_argument("--image", required=True, type=path_argument,
                      help="an image file, or a folder of them (paired with --trimap's files "
                           "by name without the extension)")
  parser.add_argument("--trimap", required=True, type=path_argument,
                      help="a trimap file (grey: 0 background, 128 unknown, 255 foreground), "
                           "or a folder of them")
  parser.add_argument("--out", type=path_argument, default=pathlib.Path("predictions"),
                      help="folder for NAME_alpha.png and NAME_preview.png, made if missing "
                           "(default: %(default)s)")
  parser.add_argument("--round-trimap", action="store_true",
                      help="map each grey trimap value to the nearest of 0, 128 and 255 "
                           "(e.g. a resized or JPEG trimap) instead of refusing other values; "
                           "colour trimaps are refused either way")
  parser.add_argument("--max-side", type=int, default=None, metavar="N",
                      help="predict images whose longer side exceeds N pixels at a reduced "
                           "size (longer side N) and upsample the alpha back (bilinear, with "
                           "the full-size trimap's known regions restored): less memory, "
                           "less detail. Without it an image too large for the memory is "
                           "refused before compiling, with the size to pass")
  args = parser.parse_args(argv)
  try:
    if args.max_side is not None and args.max_side < 16:
      raise ValueError(f"--max-side must be >= 16 pixels, got {args.max_side}")
    if args.out.exists() and not args.out.is_dir():
      raise ValueError(f"--out {args.out}: exists and is not a folder")
    pairs = _pairs(args.image, args.trimap)
    predictor = (ExportedPredictor(args.exported) if args.exported else
                 Predictor(*checkpointing.load_model_checkpoint(args.checkpoint)))
    args.out.mkdir(parents=True, exist_ok=True)
    protected = {p.resolve() for pair in pairs for p in pair}
    told_about_alpha = False
    compiled_sizes = set()
    for image_path, trimap_path in pairs:
      image, trimap, dropped_alpha = read_pair(image_path, trimap_path, args.round_trimap)
      if dropped_alpha and not told_about_alpha:
        print(f"note: {image_path} has an alpha channel; it is ignored (the network sees the "
              f"RGB values as stored, not composited); said once per run", file=sys.stderr)
        told_about_alpha = True
      full_trimap = trimap
      if args.max_side is not None:
        small_image, trimap = resized_for(image, trimap, args.max_side)
      else:
        small_image = image
      check_memory(image_path, *trimap.shape, rows=predictor.rows)
      padded = evaluation.padded_size(*trimap.shape, files.NETWORK_STRIDE)
      if padded not in compiled_sizes:
        print(f"compiling the network for {padded[1]}x{padded[0]} inputs (once per size)",
              file=sys.stderr, flush=True)
        compiled_sizes.add(padded)
      alpha = upsampled_alpha(predict_alpha(predictor, small_image, trimap), full_trimap)
      trimap = full_trimap
      alpha_path = args.out / f"{image_path.stem}_alpha.png"
      write_png(alpha_path, inputs.quantize_alpha(alpha), protected)
      write_png(args.out / f"{image_path.stem}_preview.png", preview(image, trimap, alpha),
                 protected)
      print(f"{image_path} -> {alpha_path}")
  except (ValueError, FileNotFoundError) as error:
    sys.exit(f"error: {error}")
  except OSError as error:  # a read-only or full --out, an unreadable folder
    sys.exit(f"error: {describe_os_error(error, args.out)}")


def describe_os_error(error: OSError, out: pathlib.Path) -> str:
  """One line for an OSError: under `out` (--out), that it cannot be written there."""
  name = pathlib.Path(error.filename) if error.filename else None
  reason = error.strerror or str(error)
  inside = name is None or name.absolute().is_relative_to(out.absolute())
  if inside:
    where = f" {name}" if name is not None else ""
    return f"--out {out}: cannot write{where} ({reason}); choose another --out or free space"
  return f"{name}: {reason}"


if __name__ == "__main__":
  main()
