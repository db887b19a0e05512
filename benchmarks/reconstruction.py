"""Image reconstruction with every upsampling operator (the IndexNet / A2U toy experiment).

    python benchmarks/reconstruction.py [--operators a2u carafe ...] [--steps 300]
        [--fashion-mnist DIR] [--full] [--learning-rate LR] [--out reconstruction_out]

A small encoder-decoder (configs/reconstruction.py: width 32, two 2x downsamplings of a
32x32 grey image, a 3x3 conv + ReLU at every level) is trained to reproduce its input with
an L1 loss and Adam, once per operator of `a2u_jax.upsamplers`. Operators with their own
downsampling (max_unpool, indexnet, a2u, pixel_shuffle) use it and hand its context to
the decoder; the others downsample with a stride-2 3x3 conv ("Conv/2"). FADE and SAPA are
guided by the encoder feature at the output resolution. Everything else (data, seed,
steps, initialisation of the shared layers) is the same for every row.

Data: the built-in synthetic toy set (seeded shapes, stripes and gradients; no download)
by default, or Fashion-MNIST from its standard IDX files (train-images-idx3-ubyte and
t10k-images-idx3-ubyte, optionally .gz) in --fashion-mnist DIR, zero-padded to 32x32.
--full runs the long protocol (Fashion-MNIST, batch 100, 100 epochs) meant for a GPU.

Prints one table (parameters, PSNR, SSIM, MAE, MSE on the held-out images, training step
time) and writes OUT/reconstruction.png (the first test images, one row per operator,
ground truth on top) and OUT/results.json. PSNR and SSIM come from dm_pix.
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from a2u_jax import predict, upsamplers
from configs import reconstruction as reconstruction_config


def synthetic_images(count: int, size: int, seed: int) -> np.ndarray:
  """Seeded grey images (count, size, size, 1) in [0, 1]: a background gradient with
  rectangles, ellipses and stripe patches of random grey levels."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
  images = np.empty((count, size, size), np.float32)
  for i in range(count):
    angle = rng.uniform(0, 2 * np.pi)
    image = 0.3 * rng.uniform() + 0.3 * (np.cos(angle) * xx + np.sin(angle) * yy)
    for _ in range(rng.integers(2, 5)):
      kind = rng.integers(3)
      cy, cx = rng.uniform(0.1, 0.9, 2)
      ry, rx = rng.uniform(0.08, 0.35, 2)
      if kind == 0:
        mask = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
      elif kind == 1:
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
      else:
        period = rng.uniform(0.08, 0.25)
        mask = ((np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
                & (np.sin(2 * np.pi * (xx + yy) / period) > 0))
      image = np.where(mask, rng.uniform(), image)
    images[i] = np.clip(image, 0, 1)
  return images[..., None]


def read_idx_images(path: pathlib.Path) -> np.ndarray:
  """uint8 (N, rows, cols) from an IDX3 file (plain or .gz), with errors naming the file."""
  try:
    raw = path.read_bytes()
  except FileNotFoundError:
    raise ValueError(f"{path}: file not found") from None
  if path.suffix == ".gz":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as error:
      raise ValueError(f"{path}: not an IDX image file (cannot gunzip: {error})") from None
  if len(raw) < 16 or int.from_bytes(raw[:4], "big") != 2051:
    raise ValueError(f"{path}: not an IDX image file (magic number 2051 expected)")
  count, rows, cols = (int.from_bytes(raw[o:o + 4], "big") for o in (4, 8, 12))
  if len(raw) != 16 + count * rows * cols:
    raise ValueError(f"{path}: {len(raw) - 16} bytes of pixels, expected "
                     f"{count} x {rows} x {cols}")
  return np.frombuffer(raw, np.uint8, offset=16).reshape(count, rows, cols)


def fashion_mnist(folder: pathlib.Path, size: int) -> tuple[np.ndarray, np.ndarray]:
  def load(stem):
    for name in (stem, stem + ".gz"):
      if (folder / name).exists():
        images = read_idx_images(folder / name).astype(np.float32) / 255.0
        pad = (size - images.shape[1]) // 2, (size - images.shape[2]) // 2
        images = np.pad(images, ((0, 0), (pad[0], size - images.shape[1] - pad[0]),
                                 (pad[1], size - images.shape[2] - pad[1])))
        return images[..., None]
    raise ValueError(f"{folder}: no {stem} or {stem}.gz (Fashion-MNIST IDX files)")

  return load("train-images-idx3-ubyte"), load("t10k-images-idx3-ubyte")


class ReconstructionNet(nn.Module):
  """conv3x3+ReLU, then `levels` x (down, conv3x3+ReLU), then `levels` x (up, conv3x3+ReLU),
  then a 3x3 conv to one channel; `width` channels throughout."""

  resampler: str
  width: int = 32
  levels: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    family = upsamplers.make_resampler(self.resampler)
    conv = lambda name: nn.Conv(self.width, (3, 3), name=name)  # noqa: E731
    y = nn.relu(conv("in")(x))
    guides, contexts = [], []
    for level in range(self.levels):
      guides.append(y)
      down = family.down(name=f"down{level}")
      if down is None:
        y, context = nn.Conv(self.width, (3, 3), strides=(2, 2), name=f"conv_down{level}")(y), None
      else:
        y, context = down(y, train)
      contexts.append(context)
      y = nn.relu(conv(f"enc{level}")(y))
    for level in reversed(range(self.levels)):
      y = family.up(name=f"up{level}")(y, contexts[level], guides[level])
      y = nn.relu(conv(f"dec{level}")(y))
    return nn.Conv(1, (3, 3), name="out")(y)


def train_and_test(name: str, config: ml_collections.ConfigDict, train_images: np.ndarray,
                   test_images: np.ndarray) -> dict:
  import dm_pix

  model = ReconstructionNet(name, width=config.width, levels=config.levels)
  key = jax.random.key(config.seed)
  variables = jax.jit(model.init)(key, jnp.asarray(train_images[:1]))
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  optimizer = optax.adam(config.learning_rate)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, batch):
    def loss_fn(params):
      out, updates = model.apply({"params": params, "batch_stats": batch_stats}, batch,
                                 train=True, mutable=["batch_stats"])
      return jnp.mean(jnp.abs(out - batch)), updates.get("batch_stats", {})

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  @jax.jit
  def predict(params, batch_stats, batch):
    return jnp.clip(model.apply({"params": params, "batch_stats": batch_stats}, batch), 0, 1)

  rng = np.random.default_rng(config.seed)
  times, loss = [], None
  for i in range(config.steps):
    batch = jnp.asarray(train_images[rng.integers(0, len(train_images), config.batch_size)])
    start = time.perf_counter()
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, batch)
    loss.block_until_ready()
    if i:  # the first step compiles
      times.append(time.perf_counter() - start)
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"{name}: the training loss is not finite ({float(loss)})")

  predictions = np.concatenate([
      np.asarray(predict(params, batch_stats, jnp.asarray(test_images[i:i + 256])))
      for i in range(0, len(test_images), 256)])
  target = jnp.asarray(test_images)
  return {
      "operator": name,
      "parameters": upsamplers.parameter_count(params),
      "psnr": float(jnp.mean(dm_pix.psnr(target, predictions))),
      "ssim": float(jnp.mean(dm_pix.ssim(target, predictions, max_val=1.0))),
      "mae": float(np.mean(np.abs(predictions - test_images))),
      "mse": float(np.mean((predictions - test_images) ** 2)),
      "step_ms": 1000 * float(np.median(times)) if times else float("nan"),
      "final_loss": float(loss),
      "examples": predictions[:config.figure_images],
  }


def write_figure(path: pathlib.Path, truth: np.ndarray, rows: list[dict], scale: int = 3
                 ) -> None:
  """Ground truth, then one row of reconstructions per operator; labels not drawn (the
  row order is the table's)."""
  strips = [truth] + [row["examples"] for row in rows]
  gap = 2
  size = truth.shape[1]
  grid = np.ones((len(strips) * (size + gap), len(truth) * (size + gap)), np.float32)
  for r, strip in enumerate(strips):
    for c, image in enumerate(strip):
      grid[r * (size + gap):r * (size + gap) + size,
           c * (size + gap):c * (size + gap) + size] = image[..., 0]
  pixels = np.round(grid * 255).astype(np.uint8)
  predict.write_png(path, np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--operators", nargs="+", choices=upsamplers.RESAMPLERS)
  parser.add_argument("--steps", type=int, help="training steps per operator")
  parser.add_argument("--fashion-mnist", type=pathlib.Path, help="folder of the IDX files")
  parser.add_argument("--full", action="store_true", help="the long protocol (GPU)")
  parser.add_argument("--train-images", type=int, help="synthetic training set size")
  parser.add_argument("--learning-rate", type=float, help="Adam learning rate")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("reconstruction_out"))
  args = parser.parse_args(argv)
  config = reconstruction_config.get_config("full" if args.full else "quick")
  if args.operators:
    config.operators = tuple(args.operators)
  if args.steps is not None:
    config.steps = args.steps
  if args.train_images is not None:
    config.train_images = args.train_images
  if args.learning_rate is not None:
    config.learning_rate = args.learning_rate
  if args.fashion_mnist:
    config.data, config.fashion_mnist_dir = "fashion_mnist", str(args.fashion_mnist)
  try:
    import dm_pix  # noqa: F401
  except ImportError:
    sys.exit('error: dm_pix is not installed; pip install -e ".[bench]"')
  try:
    if config.data == "fashion_mnist":
      if not config.fashion_mnist_dir:
        raise ValueError("the full protocol reads Fashion-MNIST: pass --fashion-mnist DIR")
      train_images, test_images = fashion_mnist(pathlib.Path(config.fashion_mnist_dir),
                                                config.image_size)
      data = f"Fashion-MNIST ({len(train_images)} train / {len(test_images)} test)"
    else:
      train_images = synthetic_images(config.train_images, config.image_size, config.seed)
      test_images = synthetic_images(config.test_images, config.image_size, config.seed + 1)
      data = f"synthetic toy set ({len(train_images)} train / {len(test_images)} test)"
  except ValueError as error:
    sys.exit(f"error: {error}")

  rows = []
  for name in config.operators:
    start = time.perf_counter()
    rows.append(train_and_test(name, config, train_images, test_images))
    print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)

  args.out.mkdir(parents=True, exist_ok=True)
  write_figure(args.out / "reconstruction.png", test_images[:config.figure_images], rows)
  results = [{k: v for k, v in row.items() if k != "examples"} for row in rows]
  (args.out / "results.json").write_text(json.dumps(
      {"data": data, "steps": config.steps, "batch_size": config.batch_size,
       "device": jax.devices()[0].device_kind, "rows": results}, indent=2) + "\n")
  print(f"{data}; {config.steps} Adam steps of batch {config.batch_size}, lr "
        f"{config.learning_rate}, L1 loss; {jax.devices()[0].device_kind}")
  print("| operator | parameters | PSNR (dB) | SSIM | MAE | MSE | step (ms) |")
  print("|---|---|---|---|---|---|---|")
  for row in results:
    print(f"| {row['operator']} | {row['parameters']:,} | {row['psnr']:.2f} | "
          f"{row['ssim']:.4f} | {row['mae']:.4f} | {row['mse']:.5f} | {row['step_ms']:.1f} |")
  print(f"figure: {args.out / 'reconstruction.png'} (rows: ground truth, then "
        f"{', '.join(config.operators)})")


if __name__ == "__main__":
  main()
