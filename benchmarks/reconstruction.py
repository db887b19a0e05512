"""Image reconstruction with every upsampling operator (the IndexNet / A2U toy experiment).

    python benchmarks/reconstruction.py [--protocol quick|paper] [--operators a2u carafe ...]
        [--epochs N] [--steps N] [--fashion-mnist DIR] [--train-images N]
        [--learning-rate LR] [--out reconstruction_out]

An encoder-decoder is trained to reproduce its input, once per operator of
`a2u_jax.resamplers`; everything else (data, seed, schedule, the shared layers'
initialisation) is the same for every row. Operators with their own downsampling
(max_unpool, indexnet, a2u, pixel_shuffle) use it and hand its context to the decoder; the
others downsample with a stride-2 3x3 conv ("Conv/2"). FADE and SAPA are guided by the
encoder feature at the output resolution. Two protocols (configs/reconstruction.py):

* --protocol quick (default): a small network (width 32, two 2x resamplings, 3x3 conv +
  ReLU at every level), --steps Adam steps (300) of batch 32. A smoke test of the
  plumbing on a CPU in minutes, not a ranking of the operators.
* --protocol paper: IndexNet's "RecoverNet" protocol, which the A2U paper reuses:
  conv3x3-BN-ReLU stages 32 -> 64 -> 128 with three 2x resamplings (32 -> 4), a 256 / 128
  middle, a mirrored decoder without skip connections, every conv and dense kernel
  N(0, 0.02) (operators' own layers included), BatchNorm scales N(1, 0.02); L1 loss against
  the [0, 1] image from the input normalised by mean 0.1307 / std 0.3081; batch 100, SGD
  with momentum 0.9, lr 0.01 x0.1 at epochs 50, 70 and 85 of 100 (--epochs E decays at the
  same fractions of E); the test set is scored after every epoch and both the best epoch
  (by PSNR) and the last are reported.

Data: the built-in synthetic toy set (seeded shapes, stripes and gradients; no download)
by default, or Fashion-MNIST from its standard IDX files (train-images-idx3-ubyte and
t10k-images-idx3-ubyte, optionally .gz) in --fashion-mnist DIR, resized to 32x32
(bilinear, as torchvision's Resize on the PIL image, then /255).

Metrics on the test images, predictions clipped to [0, 1]: PSNR (mean of per-image
PSNR), SSIM (dm_pix: 11x11 Gaussian window, sigma 1.5, data range 1), MAE and MSE (means
over all pixels). The kernel-sharpness readout gives, for every dynamic-kernel operator,
the mean over test pixels of each kernel's largest tap, per level (L1 = 32x32), before
training and at the end, beside the uniform value 1/taps: a box filter reads 1/taps, a
one-hot kernel 1. "up KxK" are the upsampling kernels (CARAFE, A2U, FADE, SAPA; for
DySample the four bilinear weights of each sample), "down KxK" the downsampling ones
(A2U's 6x6 kernels, IndexNet's 2x2 encoder index).

Prints one table and writes OUT/results.json and OUT/reconstruction.png (the first test
images, ground truth on top, then one row per operator in the table's order); both are
rewritten after every operator, so an interrupted run keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import pathlib
import re
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from PIL import Image

from a2u_jax import predict, resamplers
from configs import reconstruction as reconstruction_config


# --- data --------------------------------------------------------------------------------

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


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 (N, rows, cols) -> float32 (N, size, size, 1) in [0, 1]: PIL's bilinear resize of
  each 8-bit image (what torchvision's Resize does to a PIL image), then / 255."""
  resized = np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
                      for image in images])
  return (resized.astype(np.float32) / 255.0)[..., None]


def fashion_mnist(folder: pathlib.Path, size: int) -> tuple[np.ndarray, np.ndarray]:
  def load(stem):
    for name in (stem, stem + ".gz"):
      if (folder / name).exists():
        return resize_bilinear(read_idx_images(folder / name), size)
    raise ValueError(f"{folder}: no {stem} or {stem}.gz (Fashion-MNIST IDX files)")

  return load("train-images-idx3-ubyte"), load("t10k-images-idx3-ubyte")


# --- networks ----------------------------------------------------------------------------

class ReconstructionNet(nn.Module):
  """The quick protocol's network: conv3x3+ReLU, then `levels` x (down, conv3x3+ReLU), then
  `levels` x (up, conv3x3+ReLU), then a 3x3 conv to one channel; `width` channels
  throughout. (N, H, W, 1) -> (N, H, W, 1); modules down1/up1 work at full resolution."""

  resampler: str
  width: int = 32
  levels: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    family = resamplers.make_resampler(self.resampler)
    conv = lambda name: nn.Conv(self.width, (3, 3), name=name)  # noqa: E731
    y = nn.relu(conv("in")(x))
    guides, contexts = [], []
    for level in range(1, self.levels + 1):
      guides.append(y)
      down = family.down(name=f"down{level}")
      if down is None:
        y, context = nn.Conv(self.width, (3, 3), strides=(2, 2), name=f"down{level}")(y), None
      else:
        y, context = down(y, train)
      contexts.append(context)
      y = nn.relu(conv(f"enc{level}")(y))
    for level in reversed(range(1, self.levels + 1)):
      y = family.up(name=f"up{level}")(y, contexts[level - 1], guides[level - 1])
      y = nn.relu(conv(f"dec{level}")(y))
    return nn.Conv(1, (3, 3), name="out")(y)


class RecoverNet(nn.Module):
  """IndexNet's reconstruction network with `resampler` at every 2x down/upsampling.

  Encoder: per width w of `widths`, a conv3x3-BN-ReLU stage `enc{L}` to w channels, then
  down{L} (the operator's downsampling, or Conv/2: a stride-2 conv3x3-BN-ReLU). Middle:
  conv3x3-BN-ReLU to middle[0], then to middle[1] (= widths[-1]). Decoder: up{L} from the
  deepest level, each followed by a conv3x3-BN-ReLU `dec{L}` to widths[L-2]; after up1, a
  conv3x3 `out` to one channel. No skip connections (FADE and SAPA read their guide, the
  encoder feature at the output resolution, as their definition needs).
  (N, H, W, 1) -> (N, H, W, 1), H and W divisible by 2**len(widths).
  """

  resampler: str
  widths: tuple[int, ...] = (32, 64, 128)
  middle: tuple[int, ...] = (256, 128)

  @nn.compact
  def __call__(self, x, train: bool = False):
    family = resamplers.make_resampler(self.resampler)

    def stage(y, features, name, strides=1):
      y = nn.Conv(features, (3, 3), strides=strides, padding=((1, 1), (1, 1)),
                  name=f"{name}_conv")(y)
      y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       name=f"{name}_bn")(y)
      return nn.relu(y)

    guides, contexts = [], []
    y = x
    for level, width in enumerate(self.widths, start=1):
      y = stage(y, width, f"enc{level}")
      guides.append(y)
      down = family.down(name=f"down{level}")
      if down is None:
        y, context = stage(y, width, f"down{level}", strides=2), None
      else:
        y, context = down(y, train)
      contexts.append(context)
    for index, width in enumerate(self.middle, start=1):
      y = stage(y, width, f"mid{index}")
    for level in range(len(self.widths), 0, -1):
      y = family.up(name=f"up{level}")(y, contexts[level - 1], guides[level - 1])
      if level > 1:
        y = stage(y, self.widths[level - 2], f"dec{level}")
    return nn.Conv(1, (3, 3), padding=((1, 1), (1, 1)), name="out")(y)


def protocol_initialisation(variables: dict, key: jax.Array, std: float) -> dict:
  """The protocol's re-initialisation of `variables` (PyTorch's `init_weights`, normal):
  every conv / dense kernel N(0, std) with its bias 0, every BatchNorm scale N(1, std) with
  its bias 0 (operators' own layers included); GroupNorm and LayerNorm keep theirs."""
  params = traverse_util.flatten_dict(variables["params"])
  batch_norms = {path[:-1] for path in traverse_util.flatten_dict(variables.get("batch_stats",
                                                                               {}))}
  keys = dict(zip(sorted(params), jax.random.split(key, len(params))))
  fresh = {}
  for path, value in params.items():
    module, leaf = path[:-1], path[-1]
    if module in batch_norms:
      fresh[path] = (1 + std * jax.random.normal(keys[path], value.shape, value.dtype)
                     if leaf == "scale" else jnp.zeros_like(value))
    elif leaf == "kernel":
      fresh[path] = std * jax.random.normal(keys[path], value.shape, value.dtype)
    elif leaf == "bias" and module + ("kernel",) in params:
      fresh[path] = jnp.zeros_like(value)
    else:
      fresh[path] = value
  return {**variables, "params": traverse_util.unflatten_dict(fresh)}


def paper_learning_rate(config: ml_collections.ConfigDict, steps_per_epoch: int
                        ) -> optax.Schedule:
  """lr, times `decay` at each milestone; milestones are epochs of a
  `milestone_scale`-epoch run, moved to the same fractions of `config.epochs`."""
  total = config.epochs * steps_per_epoch
  boundaries = {round(m * total / config.milestone_scale): config.decay
                for m in config.milestones}
  return optax.piecewise_constant_schedule(config.learning_rate, boundaries)


# --- the kernel-sharpness readout and the test metrics ------------------------------------

def kernel_sharpness(intermediates: dict) -> dict[tuple[str, int, int], tuple[float, float]]:
  """{(kind, taps, level): (mean largest tap, uniform value)} from the "largest_tap"
  records the operators sow (`a2u_jax.layers.sow_largest_tap`); kind is "down" or "up"
  (the network module that made the kernel), level its number (1 = full resolution)."""
  readout = {}
  for path, records in traverse_util.flatten_dict(intermediates).items():
    if path[-1] != "largest_tap":
      continue
    kind, level = re.fullmatch(r"(down|up)(\d+)", path[0]).groups()
    level = int(level)
    record = records[0]
    uniform = float(record["uniform"])
    readout[(kind, round(1 / uniform), level)] = (record["mean"], uniform)
  return readout


def make_evaluator(model: nn.Module, test_images: np.ndarray, normalise: Callable,
                   batch_size: int) -> Callable[[dict], dict[str, Any]]:
  """A function of the variables: PSNR, SSIM, MAE, MSE over `test_images` (predictions
  clipped to [0, 1]), the kernel-sharpness readout, and the first predictions."""
  import dm_pix

  @jax.jit
  def score(variables, target):
    out, state = model.apply(variables, normalise(target), mutable=["intermediates"])
    out = jnp.clip(out, 0.0, 1.0)
    sums = {"psnr": jnp.sum(dm_pix.psnr(target, out)),
            "ssim": jnp.sum(dm_pix.ssim(target, out, max_val=1.0)),
            "mae": jnp.sum(jnp.mean(jnp.abs(out - target), axis=(1, 2, 3))),
            "mse": jnp.sum(jnp.mean((out - target) ** 2, axis=(1, 2, 3)))}
    return sums, state.get("intermediates", {}), out

  chunks = [test_images[i:i + batch_size] for i in range(0, len(test_images), batch_size)]

  def evaluate(variables):
    totals, sharpness, first = {}, {}, None
    for chunk in chunks:
      sums, intermediates, out = score(variables, jnp.asarray(chunk))
      first = np.asarray(out) if first is None else first
      for name, value in sums.items():
        totals[name] = totals.get(name, 0.0) + float(value)
      for key, (mean, uniform) in kernel_sharpness(intermediates).items():
        sharpness[key] = (sharpness.get(key, (0.0, uniform))[0] + float(mean) * len(chunk),
                          uniform)
    count = len(test_images)
    metrics = {name: total / count for name, total in totals.items()}
    metrics["sharpness"] = {key: (total / count, uniform)
                            for key, (total, uniform) in sharpness.items()}
    metrics["examples"] = first
    return metrics

  return evaluate


# --- training ----------------------------------------------------------------------------

def _loss_and_stats(model, params, batch_stats, inputs, target):
  out, updates = model.apply({"params": params, "batch_stats": batch_stats}, inputs,
                             train=True, mutable=["batch_stats"])
  return jnp.mean(jnp.abs(out - target)), updates.get("batch_stats", {})


def train_quick(name: str, config: ml_collections.ConfigDict, train_images: np.ndarray,
                test_images: np.ndarray) -> dict:
  """The quick protocol: Adam steps on random batches; scores at the start and the end."""
  model = ReconstructionNet(name, width=config.width, levels=config.levels)
  variables = jax.jit(model.init)(jax.random.key(config.seed), jnp.asarray(train_images[:1]))
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  optimizer = optax.adam(config.learning_rate)
  opt_state = optimizer.init(params)
  evaluate = make_evaluator(model, test_images, lambda x: x, config.eval_batch_size)
  start_scores = evaluate(variables)

  @jax.jit
  def step(params, batch_stats, opt_state, batch):
    (loss, batch_stats), grads = jax.value_and_grad(
        lambda p: _loss_and_stats(model, p, batch_stats, batch, batch), has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  rng = np.random.default_rng(config.seed)
  times, loss = [], None
  for i in range(config.steps):
    batch = jnp.asarray(train_images[rng.integers(0, len(train_images), config.batch_size)])
    start = time.perf_counter()
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, batch)
    loss.block_until_ready()
    if i:  # the first step compiles
      times.append(time.perf_counter() - start)
  if loss is not None and not np.isfinite(float(loss)):
    raise FloatingPointError(f"{name}: the training loss is not finite ({float(loss)})")
  end_scores = evaluate({"params": params, "batch_stats": batch_stats})
  return _row(name, params, start_scores, end_scores, None,
              1000 * float(np.median(times)) if times else float("nan"), [])


def train_paper(name: str, config: ml_collections.ConfigDict, train_images: np.ndarray,
                test_images: np.ndarray, log: Callable[[str], None]) -> dict:
  """The paper protocol: shuffled epochs of SGD, the test set scored before training and
  after every epoch."""
  model = RecoverNet(name, widths=tuple(config.widths), middle=tuple(config.middle))
  steps_per_epoch = len(train_images) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{len(train_images)} training images make no batch of "
                     f"{config.batch_size}; pass more --train-images")

  def normalise(x):
    return (x - config.input_mean) / config.input_std

  init_key, protocol_key = jax.random.split(jax.random.key(config.seed))
  variables = jax.jit(model.init)(init_key, jnp.zeros((1,) + train_images.shape[1:]))
  variables = protocol_initialisation(variables, protocol_key, config.init_std)
  optimizer = optax.sgd(paper_learning_rate(config, steps_per_epoch), momentum=config.momentum)
  carry = (variables["params"], variables["batch_stats"],
           optimizer.init(variables["params"]))

  def train_step(carry, images, indices):
    params, batch_stats, opt_state = carry
    target = images[indices]
    (loss, batch_stats), grads = jax.value_and_grad(
        lambda p: _loss_and_stats(model, p, batch_stats, normalise(target), target),
        has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  images = jnp.asarray(train_images)
  rng = np.random.default_rng(config.seed)

  def epoch_order():
    return rng.permutation(len(train_images))[:steps_per_epoch * config.batch_size].reshape(
        steps_per_epoch, config.batch_size)

  # One jitted step per batch: XLA:CPU runs convolutions inside a `lax.scan` body ~30x
  # slower than at the top level, and on a GPU the loop's dispatch runs ahead of the device.
  start = time.perf_counter()
  step = jax.jit(train_step).lower(carry, images, epoch_order()[0]).compile()
  log(f"{name}: compiled the training step in {time.perf_counter() - start:.1f} s")
  evaluate = make_evaluator(model, test_images, normalise, config.eval_batch_size)
  start_scores = evaluate(variables)
  best, history, epoch_times = None, [], []
  scores = start_scores
  for epoch in range(1, config.epochs + 1):
    start = time.perf_counter()
    for indices in epoch_order():
      carry, loss = step(carry, images, indices)
    loss = float(loss)
    epoch_times.append(time.perf_counter() - start)
    if not np.isfinite(loss):
      raise FloatingPointError(f"{name}: the training loss is not finite at epoch {epoch}")
    scores = evaluate({"params": carry[0], "batch_stats": carry[1]})
    history.append(round(scores["psnr"], 4))
    if best is None or scores["psnr"] > best[1]["psnr"]:
      best = (epoch, scores)
    log(f"{name}: epoch {epoch}/{config.epochs}, loss {loss:.4f}, test PSNR "
        f"{scores['psnr']:.2f} dB ({epoch_times[-1]:.1f} s)")
  step_ms = 1000 * float(np.median(epoch_times)) / steps_per_epoch
  return _row(name, carry[0], start_scores, scores, best, step_ms, history)


def _metrics(scores: dict) -> dict:
  return {name: scores[name] for name in ("psnr", "ssim", "mae", "mse")}


def _row(name, params, start_scores, end_scores, best, step_ms, history) -> dict:
  kernels = [{"kernel": kind, "taps": taps, "level": level, "uniform": uniform,
              "start": start_scores["sharpness"][(kind, taps, level)][0], "end": end}
             for (kind, taps, level), (end, uniform) in sorted(
                 end_scores["sharpness"].items(), key=lambda item: (item[0][0] != "up",
                                                                    item[0][2]))]
  row = {"operator": name, "parameters": resamplers.parameter_count(params),
         "last": _metrics(end_scores), "step_ms": step_ms, "kernels": kernels,
         "examples": end_scores["examples"]}
  if best is not None:
    row["best"] = {"epoch": best[0], **_metrics(best[1])}
    row["test_psnr_per_epoch"] = history
    row["examples"] = best[1]["examples"]
  return row


# --- output ------------------------------------------------------------------------------

def write_figure(path: pathlib.Path, truth: np.ndarray, rows: list[dict], scale: int = 3
                 ) -> None:
  """Ground truth, then one row of reconstructions per operator; labels not drawn (the
  row order is the table's)."""
  strips = [truth] + [row["examples"][:len(truth)] for row in rows]
  gap = 2
  size = truth.shape[1]
  grid = np.ones((len(strips) * (size + gap), len(truth) * (size + gap)), np.float32)
  for r, strip in enumerate(strips):
    for c, image in enumerate(strip):
      grid[r * (size + gap):r * (size + gap) + size,
           c * (size + gap):c * (size + gap) + size] = image[..., 0]
  pixels = np.round(grid * 255).astype(np.uint8)
  predict.write_png(path, np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1))


def _write_json(path: pathlib.Path, content: dict) -> None:
  staging = path.with_name(f".{path.name}.partial")
  staging.write_text(json.dumps(content, indent=2) + "\n")
  staging.replace(path)


def table(rows: list[dict], levels: int, paper: bool) -> list[str]:
  """The markdown table: metrics (best epoch and last for the paper protocol), then one
  line per kernel of a dynamic operator with its largest tap per level, start -> end."""
  level_names = [f"L{level}" for level in range(1, levels + 1)]
  head = ["operator", "parameters"]
  if paper:
    head += ["best epoch", "PSNR (dB)", "SSIM", "MAE", "MSE", "last PSNR", "last SSIM"]
  else:
    head += ["PSNR (dB)", "SSIM", "MAE", "MSE"]
  head += ["step (ms)", "kernel"] + [f"largest tap {n}, start → end" for n in level_names]
  head += ["uniform"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    scores = row["best"] if paper else row["last"]
    cells = [row["operator"], f"{row['parameters']:,}"]
    if paper:
      cells.append(str(scores["epoch"]))
    cells += [f"{scores['psnr']:.2f}", f"{scores['ssim']:.4f}", f"{scores['mae']:.4f}",
              f"{scores['mse']:.5f}"]
    if paper:
      cells += [f"{row['last']['psnr']:.2f}", f"{row['last']['ssim']:.4f}"]
    cells.append(f"{row['step_ms']:.1f}")
    kinds: dict[tuple[str, int], dict[int, dict]] = {}
    for kernel in row["kernels"]:
      kinds.setdefault((kernel["kernel"], kernel["taps"]), {})[kernel["level"]] = kernel
    if not kinds:
      lines.append("| " + " | ".join(cells + ["-"] + ["-"] * levels + ["-"]) + " |")
    for index, ((kind, taps), by_level) in enumerate(kinds.items()):
      side = math.isqrt(taps)
      readout = [f"{by_level[level]['start']:.3f} → {by_level[level]['end']:.3f}"
                 if level in by_level else "-" for level in range(1, levels + 1)]
      uniform = next(iter(by_level.values()))["uniform"]
      lead = cells if index == 0 else [""] * len(cells)
      lines.append("| " + " | ".join(lead + [f"{kind} {side}x{side}"] + readout
                                     + [f"{uniform:.3f}"]) + " |")
  return lines


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--protocol", choices=reconstruction_config.PROTOCOLS, default="quick",
                      help="quick: small network, Adam, CPU minutes (default); paper: "
                           "IndexNet's RecoverNet protocol")
  parser.add_argument("--full", action="store_true", help="the same as --protocol paper")
  parser.add_argument("--operators", nargs="+", choices=resamplers.RESAMPLERS)
  parser.add_argument("--steps", type=int, help="training steps per operator (quick)")
  parser.add_argument("--epochs", type=int, help="epochs per operator (paper; 100)")
  parser.add_argument("--fashion-mnist", type=pathlib.Path, help="folder of the IDX files")
  parser.add_argument("--train-images", type=int, help="synthetic training set size")
  parser.add_argument("--learning-rate", type=float,
                      help="base learning rate (quick: Adam, 1e-3; paper: SGD, 0.01)")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("reconstruction_out"))
  args = parser.parse_args(argv)
  protocol = "paper" if args.full else args.protocol
  config = reconstruction_config.get_config(protocol)
  paper = protocol == "paper"
  if args.steps is not None and paper:
    parser.error("--steps belongs to --protocol quick; the paper protocol counts --epochs")
  if args.epochs is not None and not paper:
    parser.error("--epochs belongs to --protocol paper; the quick protocol counts --steps")
  for flag, value in (("--steps", args.steps), ("--epochs", args.epochs),
                      ("--train-images", args.train_images)):
    if value is not None and value < 1:
      parser.error(f"{flag} must be >= 1, got {value}")
  if args.learning_rate is not None and not args.learning_rate > 0:
    parser.error(f"--learning-rate must be > 0, got {args.learning_rate}")
  if args.out.exists() and not args.out.is_dir():
    parser.error(f"--out {args.out}: exists and is not a folder")
  if args.operators:
    config.operators = tuple(args.operators)
  for field, value in (("steps", args.steps), ("epochs", args.epochs),
                       ("train_images", args.train_images),
                       ("learning_rate", args.learning_rate)):
    if value is not None:
      setattr(config, field, value)
  if args.fashion_mnist:
    config.data, config.fashion_mnist_dir = "fashion_mnist", str(args.fashion_mnist)
  try:
    import dm_pix  # noqa: F401
  except ImportError:
    sys.exit('error: dm_pix is not installed; pip install -e ".[bench]"')
  try:
    if config.data == "fashion_mnist":
      train_images, test_images = fashion_mnist(pathlib.Path(config.fashion_mnist_dir),
                                                config.image_size)
      data = f"Fashion-MNIST ({len(train_images)} train / {len(test_images)} test, 32x32)"
    else:
      train_images = synthetic_images(config.train_images, config.image_size, config.seed)
      test_images = synthetic_images(config.test_images, config.image_size, config.seed + 1)
      data = f"synthetic toy set ({len(train_images)} train / {len(test_images)} test)"
  except ValueError as error:
    sys.exit(f"error: {error}")

  device = jax.devices()[0].device_kind
  if paper:
    settings = (f"paper protocol (RecoverNet); {config.epochs} epochs of batch "
                f"{config.batch_size} ({len(train_images) // config.batch_size} steps each), "
                f"SGD momentum {config.momentum}, lr {config.learning_rate} x{config.decay} "
                f"at epochs {', '.join(str(m) for m in config.milestones)} of "
                f"{config.milestone_scale} (scaled to {config.epochs}), L1 loss")
  else:
    settings = (f"quick protocol (smoke test, not a ranking); {config.steps} Adam steps of "
                f"batch {config.batch_size}, lr {config.learning_rate}, L1 loss")
  levels = len(config.widths) if paper else config.levels

  def log(message):
    print(message, file=sys.stderr, flush=True)

  args.out.mkdir(parents=True, exist_ok=True)
  rows = []
  for name in config.operators:
    start = time.perf_counter()
    try:
      if paper:
        rows.append(train_paper(name, config, train_images, test_images, log))
      else:
        rows.append(train_quick(name, config, train_images, test_images))
    except (ValueError, FloatingPointError) as error:
      sys.exit(f"error: {error}")
    rows[-1]["seconds"] = round(time.perf_counter() - start, 1)
    log(f"{name}: {rows[-1]['seconds']:.0f} s")
    write_figure(args.out / "reconstruction.png", test_images[:config.figure_images], rows)
    _write_json(args.out / "results.json", {
        "protocol": protocol, "data": data, "settings": settings, "device": device,
        "config": config.to_dict(),
        "rows": [{k: v for k, v in row.items() if k != "examples"} for row in rows]})

  print(f"{data}; {settings}; {device}")
  print("\n".join(table(rows, levels, paper)))
  print(f"figure: {args.out / 'reconstruction.png'} (rows: ground truth, then "
        f"{', '.join(config.operators)}); results: {args.out / 'results.json'}")


if __name__ == "__main__":
  main()
