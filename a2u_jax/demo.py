"""The second half of `make demo`: matte the bundled example with a trained checkpoint.

`make demo` first trains the smoke configuration on synthetic data
(`python train.py --config configs/smoke.py --workdir demo_out/run`), then runs

  python -m a2u_jax.demo --checkpoint demo_out/run/model --out demo_out

which writes the bundled example (a seeded synthetic composite and its trimap, made here, no
download) and the network's alpha for it, plus a side-by-side preview
(input | trimap | alpha | composite on a checkerboard).
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

from a2u_jax import checkpointing, inputs, metrics, predict

EXAMPLE_SEED = 2021
EXAMPLE_SIZE = (160, 200)


def bundled_example() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(image uint8 (H, W, 3), trimap uint8 (H, W), true alpha uint8 (H, W)), seeded."""
  from data_pipeline import evaluation  # TensorFlow-backed erosion for the trimap.

  (item,) = evaluation.synthetic_items(count=1, min_size=min(EXAMPLE_SIZE),
                                       max_size=max(EXAMPLE_SIZE), seed=EXAMPLE_SEED)
  return item.load()


def run(checkpoint: pathlib.Path, out_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  out_dir.mkdir(parents=True, exist_ok=True)
  image, trimap, true_alpha = bundled_example()
  predictor = predict.Predictor(*checkpointing.load_model_checkpoint(checkpoint))
  alpha = predict.predict_alpha(predictor, image, trimap)
  alpha_8bit = inputs.quantize_alpha(alpha)
  paths = {name: out_dir / f"example_{name}.png"
           for name in ("image", "trimap", "alpha", "preview")}
  for name, array in (("image", image), ("trimap", trimap),
                      ("alpha", alpha_8bit),
                      ("preview", predict.preview(image, trimap, alpha))):
    predict.write_png(paths[name], array)
  sad = metrics.sad(alpha_8bit, true_alpha, trimap)
  print(f"alpha: {paths['alpha']}\npreview: {paths['preview']}\n"
        f"SAD on the unknown region: {sad:.3f} (in thousands, as papers report it; a smoke run is only a few steps)")
  return paths


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", type=pathlib.Path, required=True)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("demo_out"))
  args = parser.parse_args(argv)
  run(args.checkpoint, args.out)


if __name__ == "__main__":
  main()
