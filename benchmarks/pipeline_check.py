"""The JAX training pipeline on an accelerator, and train.py trained on it for real.

    python benchmarks/pipeline_check.py [--out pipeline_check.json]     # the GPU check
    python benchmarks/pipeline_check.py --quick                         # toy size (CPU)

Needs no TensorFlow. The data is a folder source (fg/, alpha/, bg/) made in a temporary
folder from the photographs of ../shared/data/alphamatting_lowres enlarged --scale times
(2x: 1.3-1.6 MP, the size of Composition-1k foregrounds), or from synthetic images where
they are absent; --folder DIR uses your own folder source instead. Sections, each
printing a table as it finishes:
  0. canvases: how many executors (distinct padded canvases) an epoch of the data
     compiles, counted from image headers;
  1. augment: `jax_composition.compose_batch` alone on a collated batch already on the
     device (the device's share: --batch crops of --crop), beside --step-ms (the A2U
     training step it must hide behind; 163.9 ms is the H200's at 512x512, batch 16);
  2. pipeline: the whole `JaxStream` (grain with --host-threads threads) in samples/s,
     the host's CPU seconds per sample (host cores per 100 samples/s), and where the
     host's time goes (decoding, planning, collating);
  3. train: train.py on configs/a2u_matting.py with --config.data.pipeline=jax on that
     folder: an uninterrupted run and a run killed with SIGKILL after its first
     checkpoint and resumed, side by side; the table gives the loss at the first and last
     steps, images/s, whether every resumed loss equals the uninterrupted run's, and
     whether validation wrote best_model/.
On a machine without grain or ml_collections, carry their wheels (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import jax  # noqa: E402
from PIL import Image  # noqa: E402

from data_pipeline import jax_composition, jax_pipeline, synthetic  # noqa: E402

SHARED_PHOTOS = ROOT.parent / "shared" / "data" / "alphamatting_lowres"


def make_folder(root: pathlib.Path, scale: float, count: int) -> str:
  """A folder source of `count` foregrounds (and as many backgrounds); returns its kind."""
  for name in ("fg", "alpha", "bg"):
    (root / name).mkdir(parents=True, exist_ok=True)
  photos = sorted(SHARED_PHOTOS.glob("image_*.png"))[:count]
  if photos:
    for photo in photos:
      image = Image.open(photo).convert("RGB")
      alpha = Image.open(str(photo).replace("image_", "alpha_")).convert("L")
      size = (round(image.width * scale), round(image.height * scale))
      image.resize(size, Image.BICUBIC).save(root / "fg" / photo.name)
      alpha.resize(size, Image.BICUBIC).save(root / "alpha" / photo.name)
      image.resize(size, Image.BICUBIC).save(root / "bg" / photo.name)
    return f"{len(photos)} shared photographs x{scale:g}"
  side = round(500 * scale)
  foregrounds, alphas, backgrounds = synthetic.synthetic_dataset(count, count, side,
                                                                 side + side // 4, seed=0)
  for i, (fg, alpha, bg) in enumerate(zip(foregrounds, alphas, backgrounds)):
    Image.fromarray(fg).save(root / "fg" / f"{i:03d}.png")
    Image.fromarray(alpha).save(root / "alpha" / f"{i:03d}.png")
    Image.fromarray(bg).save(root / "bg" / f"{i:03d}.png")
  return f"{count} synthetic images of {side}-{side + side // 4} px (no shared photographs)"


def augment_section(folder: pathlib.Path, batch: int, crop: int, repeats: int) -> dict:
  stream = jax_pipeline.JaxStream(jax_pipeline.host_source("folder", root=str(folder)),
                                  batch_size=batch, crop_size=crop)
  host_batch = jax_composition.collate([stream.plan(i) for i in range(batch)])
  on_device = jax.device_put(host_batch)
  start = time.perf_counter()
  jax.block_until_ready(jax_composition.compose_batch(on_device, crop))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(jax_composition.compose_batch(on_device, crop))
    times.append(time.perf_counter() - start)
  return {"canvas": [len(host_batch["warp_row_x"][0]), len(host_batch["warp_col_x"][0])],
          "foreground_pixels": host_batch["fg"].shape[1],
          "background_canvas": list(host_batch["background"].shape[1:3]),
          "compile_s": compile_s, "augment_ms": 1e3 * statistics.median(times)}


def canvas_section(folder: pathlib.Path, batch: int, crop: int, epochs: int) -> dict:
  """How many executors (distinct padded shapes) `epochs` epochs of the data compile,
  from image headers alone (nothing is decoded)."""
  stream = jax_pipeline.JaxStream(jax_pipeline.host_source("folder", root=str(folder)),
                                  batch_size=batch, crop_size=crop)
  batches = max(1, epochs * stream.source.epoch_length // batch)
  pairs = {stream.canvases(index) for index in range(batches)}
  return {"batches": batches, "compiles": len(pairs),
          "shapes (grid canvas / foreground pixels / background canvas)": " ".join(
              f"{c[0]}x{c[1]}/{n}/{b[0]}x{b[1]}" for c, n, b in sorted(pairs))}


def pipeline_section(folder: pathlib.Path, batch: int, crop: int, batches: int,
                     threads: int, warmup: int) -> dict:
  source = jax_pipeline.host_source("folder", root=str(folder))
  stream = jax_pipeline.JaxStream(source, batch_size=batch, crop_size=crop,
                                  num_threads=threads)
  iterator = stream.batches()
  for _ in range(warmup):  # compiles the canvases the data reaches
    jax.block_until_ready(next(iterator))
  compiles = jax_composition._compose._cache_size()
  cpu, start = time.process_time(), time.perf_counter()
  for _ in range(batches):
    jax.block_until_ready(next(iterator))
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu
  samples = batches * batch
  # Where one host thread's time goes, on examples past those timed above (cold cache).
  fresh = jax_pipeline.JaxStream(jax_pipeline.host_source("folder", root=str(folder)),
                                 batch_size=batch, crop_size=crop)
  decode = plan_time = 0.0
  plans = []
  for counter in range(batch):
    decisions = fresh.decisions(fresh.global_index(counter))
    start = time.perf_counter()
    fg, alpha = fresh.source.foreground(int(decisions.foreground_index))
    fresh.source.background(int(decisions.background_index))
    decode += time.perf_counter() - start
    start = time.perf_counter()
    plans.append(fresh.plan(counter))  # the images are cached now: planning alone
    plan_time += time.perf_counter() - start
  start = time.perf_counter()
  jax_composition.collate(plans)
  collate = time.perf_counter() - start
  return {"samples_per_s": samples / wall, "host_threads": threads,
          "compiles_after_warmup": compiles,
          "compiles_while_timed": jax_composition._compose._cache_size() - compiles,
          "host_cpu_s_per_sample": cpu / samples,
          "host_cores_per_100_samples_per_s": 100 * cpu / samples,
          "decode_ms_per_sample": 1e3 * decode / batch,
          "plan_ms_per_sample": 1e3 * plan_time / batch,
          "collate_ms_per_sample": 1e3 * collate / batch}


_CONFIG = """from configs import a2u_matting


def get_config():
  config = a2u_matting.get_config()
  config.data.pipeline, config.data.source = "jax", "folder"
  config.data.options = dict(root={root!r}, backgrounds_per_foreground=1)
  return config
"""


def _train(workdir: pathlib.Path, folder: pathlib.Path, args, cache: pathlib.Path):
  scratch_dir = cache.parent
  # The paper's config with the folder source: a config file, since flags cannot drop the
  # adobe source's options.
  config = scratch_dir / "pipeline_check_config.py"
  config.write_text(_CONFIG.format(root=str(folder)))
  command = [sys.executable, str(ROOT / "train.py"), "--config", str(config),
             "--workdir", str(workdir),
             f"--config.batch_size={args.batch}", f"--config.crop_size={args.crop}",
             f"--config.num_train_steps={args.steps}",
             f"--config.steps_per_epoch={args.steps}",
             f"--config.checkpoint_every={args.checkpoint_every}",
             f"--config.eval_every={args.steps // 2}", "--config.log_every=1",
             "--config.image_summary_every=0", "--config.validation.options.count=2",
             f"--config.compilation_cache_dir={cache}"]
  return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _losses(workdir: pathlib.Path) -> dict[int, dict]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {row["step"]: row for row in rows if "loss" in row}


def _finish(process, what: str) -> None:
  out, err = process.communicate()
  if process.returncode:
    raise RuntimeError(f"{what} failed ({process.returncode}):\n{err[-3000:]}")


def train_section(folder: pathlib.Path, args, scratch: pathlib.Path) -> dict:
  cache = scratch / "xla_cache"
  straight_dir, killed_dir = scratch / "straight", scratch / "killed"
  started = time.perf_counter()
  straight = _train(straight_dir, folder, args, cache)
  killed = _train(killed_dir, folder, args, cache)
  checkpoints = killed_dir / "checkpoints"
  while killed.poll() is None:
    done = [p for p in checkpoints.iterdir() if p.name.isdigit()] if checkpoints.exists() else []
    if done:
      break
    time.sleep(0.2)
  killed.send_signal(signal.SIGKILL)
  killed.communicate()
  _finish(straight, "the uninterrupted run")
  killed_at = max(_losses(killed_dir)) if (killed_dir / "metrics.jsonl").exists() else 0
  _finish(_train(killed_dir, folder, args, cache), "the resumed run")
  expected, resumed = _losses(straight_dir), _losses(killed_dir)
  steps = sorted(expected)
  late = [row["images_per_second"] for step, row in expected.items() if step > steps[0]]
  return {"steps": len(steps), "loss_first": expected[steps[0]]["loss"],
          "loss_last": expected[steps[-1]]["loss"],
          "images_per_s": statistics.median(late) if late else None,
          "killed_after_step": killed_at,
          "resumed_losses_equal": {s: r["loss"] for s, r in resumed.items()}
          == {s: r["loss"] for s, r in expected.items()},
          "best_model": (straight_dir / "best_model" / "model.json").exists(),
          "wall_s": time.perf_counter() - started}


def sizes(quick: bool) -> tuple[int, int, float]:
  """(batch, crop, image scale) of the full check or of the --quick one."""
  return (2, 64, 0.25) if quick else (16, 512, 2.0)


def train_batch(batch: int) -> int:
  """train.py splits the batch over every device: `batch` rounded up to a multiple of
  their count."""
  return -(-batch // jax.device_count()) * jax.device_count()


def device_rows(quick: bool, step_ms: float, host_threads: int = 4) -> dict:
  """Sections 0-2 at the full (or --quick) sizes: what device_check.py's pipeline
  section reports."""
  batch, crop, scale = sizes(quick)
  with tempfile.TemporaryDirectory() as scratch:
    folder = pathlib.Path(scratch)
    data = make_folder(folder, scale, 13)
    augment = augment_section(folder, batch, crop, 5 if quick else 20)
    augment["share_of_step"] = augment["augment_ms"] / step_ms
    pipeline = pipeline_section(folder, batch, crop, 4 if quick else 30, host_threads,
                                2 if quick else 8)
  pipeline["pipeline_over_step"] = pipeline["samples_per_s"] / (batch / (step_ms / 1e3))
  return {"data": data, "batch": batch, "crop": crop, "step_ms": step_ms,
          "augment": augment, "pipeline": pipeline,
          "markdown": "\n".join([f"data: {data}; batch {batch} of {crop}x{crop} crops",
                                 _table("device-side augmentation", augment),
                                 _table("the whole pipeline", pipeline)])}


def train_rows(quick: bool) -> dict:
  """Section 3 as device_check.py's trainpy section runs it: 60 steps at 512x512 (the
  quick plan's 6 at 64x64) on the photographs enlarged 2x, a checkpoint every 20."""
  args = argparse.Namespace()
  batch, args.crop, scale = sizes(quick)
  args.batch = train_batch(batch)
  args.steps, args.checkpoint_every = (6, 2) if quick else (60, 20)
  with tempfile.TemporaryDirectory() as scratch:
    scratch = pathlib.Path(scratch)
    data = make_folder(scratch / "data", scale, 13)
    row = train_section(scratch / "data", args, scratch)
  return row | {"markdown": f"data: {data}; batch {args.batch} of {args.crop}x{args.crop} "
                            f"crops" + _table("train.py, SIGKILL and resume", row)}


def _table(title: str, row: dict) -> str:
  cells = [f"{value:.3g}" if isinstance(value, float) else str(value) for value in row.values()]
  return (f"\n{title}\n| {' | '.join(row)} |\n|{'---|' * len(row)}\n| {' | '.join(cells)} |")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="toy sizes: crop 64, batch 2, 6 steps, 0.25x images (CPU)")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("pipeline_check.json"))
  parser.add_argument("--sections", nargs="+",
                      choices=("canvases", "augment", "pipeline", "train"),
                      default=["canvases", "augment", "pipeline", "train"])
  parser.add_argument("--folder", type=pathlib.Path, default=None,
                      help="a folder source (fg/, alpha/, bg/) to use instead of the photos")
  parser.add_argument("--epochs", type=int, default=1,
                      help="epochs of the data whose canvases are counted")
  parser.add_argument("--step-ms", type=float, default=163.9,
                      help="the A2U training step to compare with (H200, 512x512, batch 16)")
  parser.add_argument("--host-threads", type=int, default=4)
  args = parser.parse_args(argv)
  batch, args.crop, args.scale = sizes(args.quick)
  args.batch = train_batch(batch)
  args.steps, args.checkpoint_every = (6, 2) if args.quick else (300, 100)
  report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "batch": args.batch, "crop": args.crop}
  with tempfile.TemporaryDirectory() as scratch:
    scratch = pathlib.Path(scratch)
    data = args.folder or scratch / "data"
    report["data"] = (f"folder {args.folder}" if args.folder
                      else make_folder(data, args.scale, 13))
    print(f"{report['device']} ({report['backend']}); {report['data']}; batch "
          f"{args.batch} of {args.crop}x{args.crop} crops", flush=True)
    if "canvases" in args.sections:
      report["canvases"] = canvas_section(data, args.batch, args.crop, args.epochs)
      print(_table(f"0. compiled executors over {args.epochs} epoch(s) of the data",
                   report["canvases"]), flush=True)
    if "augment" in args.sections:
      row = augment_section(data, args.batch, args.crop, 5 if args.quick else 20)
      row["share_of_step"] = row["augment_ms"] / args.step_ms
      report["augment"] = row
      print(_table(f"1. device-side augmentation (step to hide behind: {args.step_ms:g} ms)",
                   row), flush=True)
    if "pipeline" in args.sections:
      row = pipeline_section(data, args.batch, args.crop,
                             4 if args.quick else 30, args.host_threads,
                             2 if args.quick else 8)
      row["step_images_per_s"] = args.batch / (args.step_ms / 1e3)
      row["pipeline_over_step"] = row["samples_per_s"] / row["step_images_per_s"]
      report["pipeline"] = row
      print(_table("2. the whole pipeline", row), flush=True)
    if "train" in args.sections:
      report["train"] = train_section(data, args, scratch)
      print(_table("3. train.py with --config.data.pipeline=jax, SIGKILL and resume",
                   report["train"]), flush=True)
  args.out.write_text(json.dumps(report, indent=2))
  print(f"\nwritten: {args.out}")


if __name__ == "__main__":
  main()
