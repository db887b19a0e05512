"""Self-contained demo of the A2U operator: learn to downsample and restore an image.

A tiny model embeds a synthetic RGB image into 32 channels, downsamples it 2x twice with
`A2UDownsample`, restores it with the paired `A2UUpsample` kernels and maps back to RGB.
The same network with average pooling and bilinear upsampling is fitted the same way as
the baseline (the paper's reconstruction experiment in miniature); both results go into one
PNG a person can look at:

  input | pool/bilinear 4x down/up | A2U 4x down/up | A2U up-kernel peakiness (finest level)

    python -m a2u_jax.reconstruction_demo --out demo_out
"""

from __future__ import annotations

import argparse
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from a2u_jax import layers, predict


def synthetic_image(size: int, seed: int = 0) -> np.ndarray:
  """(size, size, 3) float32 RGB in [0, 1]: edges, thin lines, discs and smooth shading."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  image = np.stack([0.3 + 0.4 * xx, 0.2 + 0.5 * yy, 0.6 - 0.3 * xx * yy], axis=-1)
  for _ in range(6):
    cy, cx, radius = rng.uniform(0.15, 0.85, 2).tolist() + [rng.uniform(0.05, 0.2)]
    disc = (yy - cy)**2 + (xx - cx)**2 < radius**2
    image[disc] = rng.uniform(0, 1, 3)
  for _ in range(5):
    angle, offset = rng.uniform(0, np.pi), rng.uniform(-0.4, 0.4)
    distance = np.abs((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle) - offset)
    image[distance < 1.2 / size] = rng.uniform(0, 1, 3)
  return np.clip(image, 0, 1).astype(np.float32)


class RoundTrip(nn.Module):
  """RGB -> 32 channels -> down x2 -> up x2 -> RGB.

  `a2u=True`: A2U downsampling and the paired A2U upsampling kernels; `a2u=False`: the
  same network with 2x2 average pooling and bilinear upsampling (the learned baseline).
  """

  a2u: bool = True
  channels: int = 32
  levels: int = 2

  @nn.compact
  def __call__(self, image: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    x = nn.Conv(self.channels, (3, 3))(image)
    kernels = []
    for level in range(self.levels):
      if self.a2u:
        x, up_kernels = layers.A2UDownsample(name=f"down{level}")(x)
        kernels.append(up_kernels)
      else:
        x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.Conv(self.channels, (1, 1))(x)
    for level in reversed(range(self.levels)):
      if self.a2u:
        x = layers.A2UUpsample()(x, kernels[level])
      else:
        n, h, w, c = x.shape
        x = jax.image.resize(x, (n, 2 * h, 2 * w, c), "linear")
    return nn.Conv(3, (3, 3))(x), kernels


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  return float(10 * np.log10(1.0 / np.mean((np.clip(a, 0, 1) - b)**2)))


def kernel_peakiness(up_kernels: np.ndarray) -> np.ndarray:
  """Largest tap weight per pixel, rescaled to [0, 1]: bright where A2U is selective."""
  peak = up_kernels.max(axis=-1)
  return (peak - peak.min()) / max(float(np.ptp(peak)), 1e-8)


def fit(model: RoundTrip, image: np.ndarray, steps: int, seed: int,
        learning_rate: float) -> tuple[np.ndarray, list[jax.Array]]:
  """Adam on the reconstruction MSE; returns the restored image and the up kernels."""
  batch = jnp.asarray(image)[None]
  params = jax.jit(model.init)(jax.random.key(seed), batch)["params"]
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state):
    def loss_fn(p):
      return jnp.mean((model.apply({"params": p}, batch)[0] - batch)**2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  name = "A2U" if model.a2u else "bilinear"
  start = time.perf_counter()
  for step in range(1, steps + 1):
    params, opt_state, loss = train_step(params, opt_state)
    if step == 1 or step % 100 == 0 or step == steps:
      print(f"{name:8s} step {step:4d}  mse {float(loss):.5f}  "
            f"({time.perf_counter() - start:.1f}s)")
  restored, kernels = jax.jit(model.apply)({"params": params}, batch)
  return np.asarray(restored[0]), kernels


def run(out_dir: pathlib.Path, size: int = 64, steps: int = 200, seed: int = 0,
        learning_rate: float = 1e-2) -> dict[str, float]:
  """Fits both round trips, writes `a2u_demo.png` into `out_dir`, returns PSNRs (dB)."""
  if size % 4 or size < 8:
    raise ValueError(f"--size must be a multiple of 4 and >= 8, got {size}")
  out_dir.mkdir(parents=True, exist_ok=True)
  image = synthetic_image(size, seed)
  bilinear, _ = fit(RoundTrip(a2u=False), image, steps, seed, learning_rate)
  restored, kernels = fit(RoundTrip(a2u=True), image, steps, seed, learning_rate)
  peak = kernel_peakiness(np.asarray(kernels[0][0]))
  panel = np.concatenate([image, np.clip(bilinear, 0, 1), np.clip(restored, 0, 1),
                          np.repeat(peak[..., None], 3, axis=-1)], axis=1)
  path = out_dir / "a2u_demo.png"
  predict.write_png(path, (np.clip(panel, 0, 1) * 255 + 0.5).astype(np.uint8))
  scores = {"bilinear_psnr": psnr(bilinear, image), "a2u_psnr": psnr(restored, image)}
  print(f"4x down/up reconstruction of a {size}x{size} synthetic image after {steps} steps: "
        f"pool/bilinear {scores['bilinear_psnr']:.2f} dB, A2U {scores['a2u_psnr']:.2f} dB")
  print(f"wrote {path}  (input | pool/bilinear | A2U | A2U kernel peakiness)")
  return scores


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("demo_out"),
                      help="output folder (created if missing)")
  parser.add_argument("--size", type=int, default=64, help="image side, multiple of 4")
  parser.add_argument("--steps", type=int, default=200, help="Adam steps")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")
  try:
    run(args.out, size=args.size, steps=args.steps, seed=args.seed)
  except ValueError as error:
    parser.error(str(error))


if __name__ == "__main__":
  main()
