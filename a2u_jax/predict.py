"""Run a matting checkpoint on your own image + trimap.

  python -m a2u_jax.predict --checkpoint DIR --image photo.png --trimap trimap.png [--out DIR]
  python -m a2u_jax.predict --checkpoint DIR --image photos/ --trimap trimaps/ --out DIR
  python -m a2u_jax.predict --exported FILE --image photo.png --trimap trimap.png

--exported runs an artifact of a2u-export (`a2u_jax.export`) instead of a checkpoint.

Writes NAME_alpha.png (same size as the input; 8-bit, alpha * 255 truncated as the authors
save it, so it equals `a2u_jax.evaluate`'s output) and NAME_preview.png (input | trimap |
alpha | composite on a checkerboard). Trimap values must be 0, 128 or 255; with
--round-trimap other values are mapped to the nearest of the three. Input files are never
overwritten.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
from typing import Any, Callable, Collection, Sequence

import jax
import numpy as np
from PIL import Image

from a2u_jax import checkpointing, export, inputs, parallel
from data_pipeline import evaluation, files

TRIMAP_VALUES = np.array([0, 128, 255])


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
  compiles once."""

  rows = 1

  def __init__(self, path: str | pathlib.Path):
    self.exported, self.description = export.load_exported(path)

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


def _pairs(image: pathlib.Path, trimap: pathlib.Path) -> list[tuple[pathlib.Path, pathlib.Path]]:
  if image.is_dir() != trimap.is_dir():
    raise ValueError("--image and --trimap must both be files or both be folders")
  if not image.is_dir():
    return [(image, trimap)]
  trimaps = {p.stem: p for p in trimap.iterdir() if p.suffix.lower() in files.IMAGE_EXTENSIONS}
  pairs = []
  for path in sorted(p for p in image.iterdir() if p.suffix.lower() in files.IMAGE_EXTENSIONS):
    if path.stem not in trimaps:
      raise ValueError(f"{path}: no trimap named {path.stem}.* in {trimap}")
    pairs.append((path, trimaps[path.stem]))
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
  Image.fromarray(array).save(staging)
  staging.replace(path)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  model = parser.add_mutually_exclusive_group(required=True)
  model.add_argument("--checkpoint", type=pathlib.Path,
                     help="model checkpoint folder (train.py's WORKDIR/model, or "
                          "python -m a2u_jax.convert's output)")
  model.add_argument("--exported", type=pathlib.Path,
                     help="an artifact of a2u-export (FILE, with FILE.json beside it), run "
                          "without the model code")
  parser.add_argument("--image", required=True, type=pathlib.Path, help="file or folder")
  parser.add_argument("--trimap", required=True, type=pathlib.Path, help="file or folder")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("predictions"))
  parser.add_argument("--round-trimap", action="store_true")
  args = parser.parse_args(argv)
  try:
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
      padded = evaluation.padded_size(*trimap.shape, files.NETWORK_STRIDE)
      if padded not in compiled_sizes:
        print(f"compiling the network for {padded[1]}x{padded[0]} inputs (once per size)",
              file=sys.stderr, flush=True)
        compiled_sizes.add(padded)
      alpha = predict_alpha(predictor, image, trimap)
      alpha_path = args.out / f"{image_path.stem}_alpha.png"
      write_png(alpha_path, inputs.quantize_alpha(alpha), protected)
      write_png(args.out / f"{image_path.stem}_preview.png", preview(image, trimap, alpha),
                 protected)
      print(f"{image_path} -> {alpha_path}")
  except (ValueError, FileNotFoundError) as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  main()
