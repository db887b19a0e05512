"""Training-data throughput: our tf.data and JAX pipelines against the authors' per-sample
approach.

All run the Deep Image Matting protocol (data_pipeline.composition, data_pipeline.
jax_composition, and the NumPy/OpenCV transcription in dim_protocol_numpy.py) on the same
images, 512 crops:
  - synthetic foregrounds and backgrounds of realistic size (1-2 MP), held in memory;
  - the real photographs of ../shared/data/alphamatting_lowres read from disk (tf.data and
    the baseline decode them every time)
    (the photos as foregrounds with their alphas, the photos again as backgrounds).
The JAX pipeline keeps its last 256 decoded images (`jax_pipeline.HostSource`), and is timed
on a second pass over the same batches, so that no compilation falls in the timing; both
pipelines' first batch (start-up) is not timed. The
baseline runs in a multiprocessing pool with one worker per core, the way the authors'
DataLoader runs; its workers return only a checksum, so it is not charged for handing the
arrays back (ours is: it yields NumPy batches). Prints one table.

  python benchmarks/input_pipeline.py [--samples 256] [--crop 512] [--gpu-tflops 100]

--gpu-tflops T also prints how many samples/s a GPU sustaining T TFLOP/s on the A2U
network's training step consumes (FLOPs per crop from XLA's cost analysis of one
forward+backward pass), i.e. what the pipeline must deliver to keep it busy.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import pathlib
import time

import numpy as np

from data_pipeline import synthetic

_HERE = pathlib.Path(__file__).resolve().parent

_spec = importlib.util.spec_from_file_location("dim_protocol_numpy",
                                               _HERE / "dim_protocol_numpy.py")
dim_protocol_numpy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dim_protocol_numpy)

SHARED_PHOTOS = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
                 / "alphamatting_lowres")

_WORKER: dict = {}


def _init_worker(kind, payload, crop):
  import cv2  # noqa: F401  (fail early in the worker if OpenCV is missing)
  _WORKER.update(kind=kind, payload=payload, crop=crop)


def _load(kind, payload, index):
  if kind == "arrays":
    foregrounds, alphas, _ = payload
    return foregrounds[index], alphas[index]
  import cv2
  fg_paths, alpha_paths, _ = payload
  return cv2.imread(fg_paths[index]), cv2.imread(alpha_paths[index], cv2.IMREAD_GRAYSCALE)


def _load_background(kind, payload, index):
  if kind == "arrays":
    return payload[2][index]
  import cv2
  return cv2.imread(payload[2][index])


def _reference_sample(index):
  kind, payload, crop = _WORKER["kind"], _WORKER["payload"], _WORKER["crop"]
  rng = np.random.default_rng(index)
  count = len(payload[0])
  fg, alpha = _load(kind, payload, index % count)
  fg2, alpha2 = _load(kind, payload, int(rng.integers(count)))
  bg = _load_background(kind, payload, int(rng.integers(len(payload[2]))))
  out = dim_protocol_numpy.compose_reference(fg, alpha, fg2, alpha2, bg, crop, rng)
  # The authors' ToTensor: channels-first float32 arrays.
  tensors = [np.ascontiguousarray(out[k].transpose(2, 0, 1), np.float32)
             for k in ("image", "fg", "bg", "alpha", "trimap")]
  return float(sum(t[:, ::64, ::64].sum() for t in tensors))


def reference_rate(kind, payload, crop, samples, workers):
  ctx = multiprocessing.get_context("fork")
  with ctx.Pool(workers, initializer=_init_worker, initargs=(kind, payload, crop)) as pool:
    list(pool.imap(_reference_sample, range(workers * 2)))  # warm-up
    start = time.perf_counter()
    list(pool.imap(_reference_sample, range(samples), chunksize=1))
    return samples / (time.perf_counter() - start)


def pipeline_rate(source, crop, samples, batch_size):
  import data_pipeline

  iterator = data_pipeline.train_batches(source, batch_size=batch_size, crop_size=crop)
  next(iterator)  # warm-up: graph construction and the first batch
  batches = max(1, samples // batch_size)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch_size / (time.perf_counter() - start)


def jax_rate(payload, crop, samples, batch_size):
  """The JAX pipeline as train.py runs it (data_pipeline.jax_pipeline): grain's threads
  decode and plan, the device (here the CPU itself) composites each batch."""
  import jax

  from data_pipeline import jax_composition, jax_pipeline

  source = jax_pipeline.HostSource("benchmark", *payload)
  batches = max(1, samples // batch_size)

  def run():
    iterator = jax_pipeline.JaxStream(source, batch_size=batch_size,
                                      crop_size=crop).batches()
    # The first batch warms the pipeline up (its threads start and fill their buffer),
    # as tf.data's does in pipeline_rate; the next ones are timed.
    jax.block_until_ready(next(iterator))
    start = time.perf_counter()
    for _ in range(batches):
      jax.block_until_ready(next(iterator))
    return time.perf_counter() - start

  run()  # compiles an executor for each canvas these batches reach
  compiled = jax_composition._compose._cache_size()
  seconds = run()  # the same batches again
  assert jax_composition._compose._cache_size() == compiled, "compiled while timed"
  return batches * batch_size / seconds


def _payload(kind, min_size, max_size):
  """(foregrounds, alphas, backgrounds) of a case: arrays, or the photos' paths."""
  if kind == "arrays":
    return synthetic.synthetic_dataset(8, 8, min_size, max_size, seed=0)
  images = sorted(str(p) for p in SHARED_PHOTOS.glob("image_*.png"))
  return images, [p.replace("image_", "alpha_") for p in images], images


def _pipeline_rate_here(pipeline, kind, min_size, max_size, crop, samples, batch_size):
  """(samples/s, JAX's backend) of one pipeline, in the process that calls it."""
  payload = _payload(kind, min_size, max_size)
  if pipeline == "jax":
    import jax

    return jax_rate(payload, crop, samples, batch_size), jax.default_backend()
  import data_pipeline

  source = (data_pipeline.ArraySource("synthetic", *payload) if kind == "arrays"
            else data_pipeline.FileSource("photos", *payload))
  return pipeline_rate(source, crop, samples, batch_size), None


def pipeline_rate_alone(*args):
  """`_pipeline_rate_here` in a fresh process: one pipeline's threads, buffers and freed
  memory do not slow the next one measured, and the JAX pipeline runs without
  TensorFlow loaded, as on an accelerator host."""
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    return pool.apply(_pipeline_rate_here, args)


def training_step_flops(crop: int) -> float:
  """FLOPs of one forward+backward pass of the A2U network on one crop (XLA's count)."""
  import jax
  import jax.numpy as jnp

  from a2u_jax.models.matting import a2u_matting

  model = a2u_matting()
  inputs = jnp.zeros((1, crop, crop, 4))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), inputs))

  def loss(variables, inputs):
    out, _ = model.apply(variables, inputs, train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.PRNGKey(1)})
    return out.mean()

  analysis = jax.jit(jax.grad(loss)).lower(variables, inputs).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return float(analysis["flops"])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--samples", type=int, default=256,
                      help="samples timed per row (fewer: a noisier rate)")
  parser.add_argument("--crop", type=int, default=512)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--min-size", type=int, default=1000,
                      help="synthetic image side range (1000-1400: 1-2 MP)")
  parser.add_argument("--max-size", type=int, default=1400)
  parser.add_argument("--step-seconds", type=float, default=None,
                      help="a GPU training step time to compare with (batch --batch)")
  parser.add_argument("--gpu-tflops", type=float, default=None,
                      help="sustained GPU TFLOP/s to translate into samples/s needed")
  args = parser.parse_args(argv)
  workers = os.cpu_count() or 1

  cases = [("synthetic, in memory", "arrays")]
  if SHARED_PHOTOS.is_dir():
    cases.append(("real photos, from disk", "files"))
  else:
    print(f"(no {SHARED_PHOTOS}: real-photo row skipped)")

  print(f"{workers} CPU cores; {args.crop}x{args.crop} crops; samples/s (higher is better); "
        "each pipeline measured in a process of its own\n")
  header = None
  for label, kind in cases:
    sizes = (args.min_size, args.max_size)
    ours, _ = pipeline_rate_alone("tf", kind, *sizes, args.crop, args.samples, args.batch)
    on_device, backend = pipeline_rate_alone("jax", kind, *sizes, args.crop, args.samples,
                                             args.batch)
    theirs = reference_rate(kind, _payload(kind, *sizes), args.crop, args.samples, workers)
    if header is None:
      header = (f"| data | tf.data pipeline (ours) | JAX pipeline (ours, device = {backend}) "
                f"| NumPy+OpenCV pool of {workers} (authors' approach) | JAX / tf.data | "
                "tf.data / authors' |")
      print(header + "\n|---|---|---|---|---|---|")
    print(f"| {label} | {ours:.1f} | {on_device:.1f} | {theirs:.1f} | "
          f"{on_device / ours:.2f}x | {ours / theirs:.2f}x |", flush=True)
    if args.step_seconds:
      need = args.batch / args.step_seconds
      print(f"|   a {args.step_seconds:g} s step at batch {args.batch} needs {need:.1f} "
            f"samples/s | | | |")
  if args.gpu_tflops:
    flops = training_step_flops(args.crop)
    print(f"\nA2U network forward+backward: {flops / 1e9:.0f} GFLOP per {args.crop}x"
          f"{args.crop} crop; a GPU sustaining {args.gpu_tflops:g} TFLOP/s consumes "
          f"{args.gpu_tflops * 1e12 / flops:.0f} samples/s.")


if __name__ == "__main__":
  main()
