"""Classical affinity-based matting (PyMatting) scored with our MATLAB-exact metrics.

    pip install -e ".[bench]"          # pymatting (and numba)
    python benchmarks/classical_baseline.py [--data-dir ../shared/data/alphamatting_lowres]
        [--methods cf knn] [--checkpoint DIR] [--limit N] [--out DIR]

Runs PyMatting's solvers (default: closed-form matting, Levin et al. 2008, and KNN
matting, Chen et al. 2013; also available: lkm, rw, sm) on every image + trimap of the
set, post-processes each alpha exactly as our evaluation does for the network (clipped,
known trimap regions restored, * 255 truncated to 8 bits) and scores it with
`a2u_jax.metrics`. With --checkpoint, a learned model is run on the same images
(`a2u_jax.predict`) and gets its own row. Prints one table: mean SAD, MSE, Grad, Conn
(the papers' units) and seconds per image, a row per method. --out writes every alpha.

Data: a folder in the alphamatting.com layout (image_XX, trimap_XX, alpha_XX; the
default is the shared real photographs when present) or, with --folder, a folder with
image/, trimap/ and alpha/. PyMatting's first call compiles its Numba kernels; that time
is not counted (each method is warmed up on a small crop first).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
from PIL import Image

from a2u_jax import inputs, metrics

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "alphamatting_lowres"
METHODS = {
    "cf": ("closed-form (Levin 2008)", "estimate_alpha_cf"),
    "knn": ("KNN (Chen 2013)", "estimate_alpha_knn"),
    "lkm": ("large kernel (He 2010)", "estimate_alpha_lkm"),
    "rw": ("random walk (Grady 2005)", "estimate_alpha_rw"),
    "sm": ("shared (Gastal 2010)", "estimate_alpha_sm"),
}


def classical_alpha(method: str, image: np.ndarray, trimap: np.ndarray) -> np.ndarray:
  """PyMatting's alpha for uint8 image (H, W, 3) and trimap (H, W), as float (H, W)."""
  import pymatting

  solver = getattr(pymatting, METHODS[method][1])
  return solver(image.astype(np.float64) / 255.0, trimap.astype(np.float64) / 255.0)


def score(alpha: np.ndarray, gt: np.ndarray, trimap: np.ndarray) -> tuple[np.ndarray, dict]:
  """The evaluation's post-processing and the four metrics of a [0, 1] alpha."""
  alpha = np.asarray(inputs.postprocess_alpha(alpha[..., None], trimap[..., None]))[..., 0]
  alpha_8bit = inputs.quantize_alpha(alpha)
  return alpha_8bit, metrics.all_metrics(alpha_8bit, gt, trimap)


def _items(args):
  import data_pipeline

  if args.folder:
    items = data_pipeline.folder_items(args.data_dir)
  else:
    items = data_pipeline.alphamatting_items(args.data_dir, trimap=args.trimap_prefix)
  items = [item for item in items][:args.limit]
  loaded = []
  for item in items:
    image, trimap, gt = item.load()
    if gt is None:
      raise ValueError(f"{item.name}: no ground-truth alpha to score against")
    loaded.append((item.name, image, trimap, gt))
  return loaded


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data-dir", type=pathlib.Path, default=DEFAULT_DATA)
  parser.add_argument("--folder", action="store_true",
                      help="--data-dir has image/, trimap/, alpha/ folders")
  parser.add_argument("--trimap-prefix", default="trimap")
  parser.add_argument("--methods", nargs="+", default=["cf", "knn"], choices=sorted(METHODS))
  parser.add_argument("--checkpoint", type=pathlib.Path,
                      help="also score this matting checkpoint on the same images")
  parser.add_argument("--limit", type=int, default=None, help="only the first N images")
  parser.add_argument("--out", type=pathlib.Path, help="write every alpha here")
  args = parser.parse_args(argv)
  try:
    import pymatting  # noqa: F401
  except ImportError:
    sys.exit('error: pymatting is not installed; pip install -e ".[bench]"')
  try:
    data = _items(args)
  except ValueError as error:
    sys.exit(f"error: {error}")

  runners = {}
  for method in args.methods:
    runners[METHODS[method][0]] = (method, lambda image, trimap, m=method:
                                   classical_alpha(m, image, trimap))
  if args.checkpoint:
    from a2u_jax import checkpointing, predict

    predictor = predict.Predictor(*checkpointing.load_model_checkpoint(args.checkpoint))
    runners[f"network ({args.checkpoint.name})"] = (
        "network", lambda image, trimap: predict.predict_alpha(predictor, image, trimap))

  # A small problem with background, unknown and foreground columns, to compile first.
  warm_image = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
  warm_trimap = np.repeat(np.repeat(np.array([0, 128, 255], np.uint8), [10, 12, 10])[None],
                          32, axis=0)
  rows = []
  for label, (key, run) in runners.items():
    run(warm_image, warm_trimap)  # Numba / XLA compilation, not timed.
    totals, seconds = {name: [] for name in metrics.METRICS}, 0.0
    for name, image, trimap, gt in data:
      start = time.perf_counter()
      alpha = run(image, trimap)
      seconds += time.perf_counter() - start
      alpha_8bit, values = score(np.asarray(alpha, np.float64), gt, trimap)
      for metric, value in values.items():
        totals[metric].append(value)
      if args.out:
        (args.out / key).mkdir(parents=True, exist_ok=True)
        Image.fromarray(alpha_8bit).save(args.out / key / f"{name}.png")
    rows.append((label, *(float(np.nanmean(totals[m])) for m in metrics.METRICS),
                 seconds / len(data)))
    print(f"{label}: done", file=sys.stderr)

  print(f"{len(data)} images from {args.data_dir} (trimap '{args.trimap_prefix}'); "
        f"metrics as the authors' MATLAB code, SAD/Grad/Conn / 1000")
  print(f"{'method':<28} {'SAD':>8} {'MSE':>8} {'Grad':>8} {'Conn':>8} {'s/image':>8}")
  for label, sad, mse, grad, conn, per_image in rows:
    print(f"{label:<28} {sad:>8.2f} {mse:>8.4f} {grad:>8.2f} {conn:>8.2f} {per_image:>8.2f}")


if __name__ == "__main__":
  main()
