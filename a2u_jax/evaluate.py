"""Evaluate a matting checkpoint on a test set with the authors' protocol, on all devices.

  python -m a2u_jax.evaluate --checkpoint DIR --data alphamatting --data-dir PATH --out DIR
  python -m a2u_jax.evaluate --checkpoint DIR --data composition1k --data-dir TFDS_DIR ...

Data (`--data`): `synthetic` (built in, no download), `folder` (DATA_DIR/image, trimap and
optionally alpha, matched by file stem; images without an alpha are predicted and listed,
not scored), `alphamatting` (alphamatting.com layout:
image_XX / trimap_XX / alpha_XX in one folder; `--trimap-prefix trimap2` picks the other
trimap set), `composition1k` and `distinctions646` (prepared TFDS builders in DATA_DIR).

Every image is evaluated whole, as in the authors' `scripts/test.py`: reflect-padded at the
bottom/right to a multiple of 16, run in eval mode, cropped back, clipped to [0, 1], the
trimap's known regions restored, and multiplied by 255 and truncated to uint8 (their
`astype(np.uint8)`). The metrics are computed on exactly those saved 8-bit alphas, with the
MATLAB semantics of `a2u_jax.metrics`, so running the authors' MATLAB scripts on OUT/alpha
gives the same numbers.

Images are grouped by padded shape; each group runs data-parallel over the local devices
(`predict.Predictor`, on `parallel.DataParallel`), with the last batch of a group filled
by masked copies so that nothing is counted twice or dropped. There is one compilation per shape group.

Outputs, in --out: alpha/NAME.png (8-bit alpha, the input's size), metrics.csv (one row per
image, in the test set's order: name, height, width, sad, mse, grad, conn) and run.json
(what was evaluated). While a run is under way each process appends its rows to
metrics.part-I.csv; they are merged into metrics.csv at the end. Every PNG and metrics.csv
is complete when it appears. With --resume, images that already have a row (in metrics.csv
or a part file left by a killed run) and a PNG are skipped; without it, an --out that
holds results is refused.

Several processes (one per host, JAX's multi-controller runtime; --out on storage they
share) split the test set: each evaluates every N-th image on its own devices, and
process 0 merges the rows and prints the table:

  python -m a2u_jax.evaluate ... --coordinator_address HOST0:1234 --num_processes N \
      --process_id I          # on host I; or --distributed where JAX detects the cluster
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from a2u_jax import checkpointing, distributed, inputs, metrics, predict
from data_pipeline import files

ALPHA_DIR = "alpha"
METRICS_CSV = "metrics.csv"
RUN_JSON = "run.json"
PART_GLOB = "metrics.part-*.csv"  # each process's rows while a run is under way
CSV_COLUMNS = ("name", "height", "width", "sad", "mse", "grad", "conn")
DATA_KINDS = ("synthetic", "folder", "alphamatting", "composition1k", "distinctions646")


def load_items(data: str, data_dir: str | None = None, *, trimap_prefix: str = "trimap",
               count: int = 8) -> list:
  """Evaluation items (data_pipeline.EvalItem) for a `--data` kind."""
  import data_pipeline

  if data not in DATA_KINDS:
    raise ValueError(f"--data must be one of {', '.join(DATA_KINDS)}, got {data!r}")
  if data == "synthetic":
    return data_pipeline.synthetic_items(count=count)
  if not data_dir:
    raise ValueError(f"--data {data} needs --data-dir")
  if data == "folder":
    return data_pipeline.folder_items(data_dir)
  if data == "alphamatting":
    return data_pipeline.alphamatting_items(data_dir, trimap=trimap_prefix)
  return data_pipeline.tfds_items(data, data_dir)


def _file_stem(name: str) -> str:
  stem = name[:-len(pathlib.Path(name).suffix)] if name.lower().endswith(files.IMAGE_EXTENSIONS) else name
  if not stem or stem.startswith(".") or "/" in stem or "\\" in stem:
    raise ValueError(f"image name {name!r} cannot be used as a file name")
  return stem


def _complete_rows(path: pathlib.Path) -> list[dict[str, str]]:
  """The rows of a metrics CSV, without a torn last line (a run killed while writing)."""
  if not path.exists():
    return []
  text = path.read_text()
  complete = text if text.endswith("\n") else text[:text.rfind("\n") + 1]
  rows = list(csv.DictReader(complete.splitlines()))
  if rows and tuple(rows[0]) != CSV_COLUMNS:
    raise ValueError(f"{path}: unexpected columns {tuple(rows[0])}, expected "
                     f"{CSV_COLUMNS}; not a metrics file of this tool")
  return rows


def _part_files(out_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(out_dir.glob(PART_GLOB))


def _read_done(out_dir: pathlib.Path, alpha_dir: pathlib.Path) -> dict[str, dict[str, str]]:
  """Rows of earlier runs (metrics.csv and the processes' part files) whose PNG exists."""
  rows = _complete_rows(out_dir / METRICS_CSV)
  for part in _part_files(out_dir):
    rows += _complete_rows(part)
  return {row["name"]: row for row in rows
          if (alpha_dir / f"{_file_stem(row['name'])}.png").exists()}


def _merge(out_dir: pathlib.Path, done: dict[str, dict[str, str]], names: Sequence[str]
           ) -> None:
  """metrics.csv := `done` and every part file's rows, in item order; the parts go."""
  rows = dict(done)
  for part in _part_files(out_dir):
    rows.update({row["name"]: row for row in _complete_rows(part)})
  _write_csv(out_dir / METRICS_CSV, [rows[name] for name in names if name in rows])
  for part in _part_files(out_dir):
    part.unlink()


def _write_csv(path: pathlib.Path, rows) -> None:
  staging = path.with_name(f".{path.name}.partial")
  with staging.open("w", newline="") as f:
    writer = csv.DictWriter(f, CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  staging.replace(path)


def valid_predictions(batch: dict, alphas: np.ndarray):
  """The real (not filler) images of an `eval_batches` batch, cropped to their size:
  yields (name, 8-bit alpha as the authors save it, gt uint8 or None, trimap), each (H, W).
  `alphas`: the post-processed [0, 1] predictions for the padded batch, (B, Hp, Wp, 1)."""
  for i in np.flatnonzero(batch["valid"]):
    h, w = int(batch["height"][i]), int(batch["width"][i])
    gt = batch["alpha"][i, :h, :w, 0] if batch["has_alpha"][i] else None
    yield (batch["name"][i], inputs.quantize_alpha(alphas[i, :h, :w, 0]), gt,
           batch["trimap"][i, :h, :w, 0])


def _format(value: float) -> str:
  return "" if value is None else repr(float(value))


def _score(name: str, alpha: np.ndarray, gt: np.ndarray | None, trimap: np.ndarray
           ) -> dict[str, str]:
  row = {"name": name, "height": str(alpha.shape[0]), "width": str(alpha.shape[1])}
  values = metrics.all_metrics(alpha, gt, trimap) if gt is not None else {}
  row.update({key: _format(values.get(key)) for key in metrics.METRICS})
  return row


def summarize(rows: Sequence[dict[str, str]]) -> dict[str, Any]:
  """Means over the rows that have ground truth; MSE leaves out images without unknown
  pixels (their MSE is nan). Returns the means and the names left out."""
  scored = [row for row in rows if row["sad"] != ""]
  summary: dict[str, Any] = {"images": len(rows), "scored": len(scored)}
  for key in metrics.METRICS:
    values = np.array([float(row[key]) for row in scored])
    finite = values[np.isfinite(values)]
    summary[key] = float(finite.mean()) if finite.size else math.nan
  summary["no_unknown"] = [row["name"] for row in scored if math.isnan(float(row["mse"]))]
  summary["unscored"] = [row["name"] for row in rows if row["sad"] == ""]
  return summary


def format_table(summary: dict[str, Any]) -> str:
  """The papers' layout: SAD, MSE, Grad, Conn, and a line saying their units."""
  header = f"{'images':>7} {'SAD':>8} {'MSE':>8} {'Grad':>8} {'Conn':>8}"
  row = (f"{summary['scored']:>7} {summary['sad']:>8.2f} {summary['mse']:>8.4f} "
         f"{summary['grad']:>8.2f} {summary['conn']:>8.2f}")
  units = ("(means over the images; SAD, Grad and Conn are sums over each image's unknown "
           "region in thousands, MSE a mean over its unknown pixels; alpha in [0, 1])")
  return f"{header}\n{row}\n{units}"


def evaluate(model, variables: dict[str, Any], items: Sequence, out_dir: str | os.PathLike,
             **options) -> dict[str, Any]:
  """`_evaluate` (below) with `out_dir` locked: a second evaluation into the same folder is
  refused while this one runs, naming it (process 0 holds the lock)."""
  from a2u_jax.training import workdir as workdir_lib

  out_dir = pathlib.Path(out_dir)
  if distributed.is_lead():
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir_lib.lock(out_dir, "--out")
  try:
    return _evaluate(model, variables, items, out_dir, **options)
  finally:
    workdir_lib.release(out_dir)


def _evaluate(model, variables: dict[str, Any], items: Sequence, out_dir: str | os.PathLike,
              *, devices: Sequence[jax.Device] | None = None, batch_per_device: int = 1,
              resume: bool = False, run_info: dict[str, Any] | None = None,
              progress: bool = True, predictor: predict.Predictor | None = None
              ) -> dict[str, Any]:
  """Predicts, saves and scores every item; returns `summarize` of all rows of the CSV
  (with "compilations" and "seconds" added).

  In a multi-host run (after `a2u_jax.distributed.initialize`) every process calls it with
  the same items and an out_dir on storage they share: each one takes every N-th image
  still to do, runs it on its own devices, and writes the PNGs and its rows
  (metrics.part-I.csv); process 0 then merges all rows into metrics.csv, in item order,
  and every process returns the same summary.

  Args:
    model, variables: from `checkpointing.load_model_checkpoint`.
    items: `data_pipeline.EvalItem`s (see `load_items`).
    out_dir: where alpha/, metrics.csv and run.json go.
    devices: local devices to split batches over (default: all local devices).
    batch_per_device: images per device per step.
    resume: skip images already scored; without it a used out_dir is refused.
    run_info: what is being evaluated (checkpoint, data); a resumed run must match it.
    predictor: reuse a `predict.Predictor` (and its compilations) across calls.
  """
  import data_pipeline
  from tqdm import tqdm

  if batch_per_device < 1:
    raise ValueError(f"batch_per_device must be >= 1, got {batch_per_device}")
  out_dir = pathlib.Path(out_dir)
  alpha_dir, csv_path, info_path = out_dir / ALPHA_DIR, out_dir / METRICS_CSV, out_dir / RUN_JSON
  run_info = dict(run_info or {})
  used = (csv_path.exists() or bool(_part_files(out_dir))
          or (alpha_dir.is_dir() and any(alpha_dir.iterdir())))
  if not resume and used:
    raise ValueError(f"{out_dir} already holds results; pass --resume to continue that run "
                     f"or choose another --out")
  if resume and info_path.exists():
    previous = json.loads(info_path.read_text())
    if previous != run_info:
      raise ValueError(f"{info_path}: the results there are for {previous}, not "
                       f"{run_info}; choose another --out")
  names = [item.name for item in items]
  if len(set(names)) != len(names):
    raise ValueError("evaluation items have duplicate names")
  stems = {item.name: _file_stem(item.name) for item in items}
  done = _read_done(out_dir, alpha_dir) if resume else {}
  distributed.barrier("evaluate: earlier results read")
  lead = distributed.is_lead()
  if lead:
    alpha_dir.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps(run_info, indent=2, sort_keys=True) + "\n")
    _merge(out_dir, done, names)
  distributed.barrier("evaluate: output folder ready")
  todo = [item for item in items if item.name not in done]
  mine = todo[jax.process_index()::jax.process_count()]

  if predictor is None:
    predictor = predict.Predictor(model, variables, devices or jax.local_devices())
  compilations_before = predictor.compilations
  batch_size = batch_per_device * len(predictor.devices)
  start = time.perf_counter()
  part_path = out_dir / PART_GLOB.replace("*", str(jax.process_index()))
  initial = len(done) if jax.process_count() == 1 else 0
  with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool, \
      part_path.open("w", newline="") as part_file, \
      tqdm(total=initial + len(mine), initial=initial, desc="evaluate", unit="image",
           disable=not (progress and lead)) as bar:
    writer = csv.DictWriter(part_file, CSV_COLUMNS)
    writer.writeheader()
    pending: list[concurrent.futures.Future] = []

    def finish(future):
      writer.writerow(future.result())
      part_file.flush()
      bar.update()

    def save_and_score(name, alpha, gt, trimap):
      predict.write_png(alpha_dir / f"{stems[name]}.png", alpha)
      return _score(name, alpha, gt, trimap)

    if mine:
      for batch in data_pipeline.eval_batches(mine, batch_size=batch_size):
        alphas = predictor(batch["image"], batch["trimap"])
        for name, alpha, gt, trimap in valid_predictions(batch, alphas):
          pending.append(pool.submit(save_and_score, name, alpha, gt, trimap))
        while pending and pending[0].done():
          finish(pending.pop(0))
      for future in pending:
        finish(future)

  distributed.barrier("evaluate: every image scored")
  if lead:
    _merge(out_dir, done, names)
  distributed.barrier("evaluate: rows merged")
  summary = summarize(_complete_rows(csv_path))
  summary["compilations"] = predictor.compilations - compilations_before
  summary["seconds"] = time.perf_counter() - start
  return summary


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, type=pathlib.Path,
                      help="model checkpoint folder (train.py's WORKDIR/model, or "
                           "python -m a2u_jax.convert's output)")
  parser.add_argument("--data", required=True, choices=DATA_KINDS)
  parser.add_argument("--data-dir", help="folder of the test set (not for synthetic)")
  parser.add_argument("--trimap-prefix", default="trimap",
                      help="alphamatting layout: trimap file prefix (trimap or trimap2)")
  parser.add_argument("--count", type=int, default=8, help="synthetic: number of images")
  parser.add_argument("--out", required=True, type=predict.path_argument)
  parser.add_argument("--batch-per-device", type=int, default=1)
  parser.add_argument("--devices", type=int, default=None,
                      help="use the first N local devices (default: all)")
  parser.add_argument("--resume", action="store_true",
                      help="continue a run in --out, skipping images already scored")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--coordinator_address", help="multi-process runs: HOST:PORT of "
                      "process 0's coordinator (with --num_processes and --process_id)")
  parser.add_argument("--num_processes", type=int, help="multi-process runs: how many")
  parser.add_argument("--process_id", type=int, help="multi-process runs: this one, 0..N-1")
  parser.add_argument("--distributed_timeout", type=float,
                      default=distributed.DEFAULT_TIMEOUT,
                      help="multi-process runs: seconds to wait at start-up for every "
                           "process to join (default: %(default)s)")
  parser.add_argument("--distributed", action="store_true",
                      help="multi-process runs where JAX detects the cluster (SLURM, Open "
                           "MPI, TPU pods, Kubernetes)")
  args = parser.parse_args(argv)
  try:
    distributed.initialize(auto=args.distributed,
                           coordinator_address=args.coordinator_address,
                           num_processes=args.num_processes, process_id=args.process_id,
                           timeout=args.distributed_timeout)
  except ValueError as error:
    parser.error(str(error))
  try:
    if args.count < 1:
      raise ValueError(f"--count must be >= 1, got {args.count}")
    if args.batch_per_device < 1:
      raise ValueError(f"--batch-per-device must be >= 1, got {args.batch_per_device}")
    if args.out.exists() and not args.out.is_dir():
      raise ValueError(f"--out {args.out}: exists and is not a folder")
    devices = jax.local_devices()
    if args.devices is not None:
      if not 1 <= args.devices <= len(devices):
        raise ValueError(f"--devices must be in 1..{len(devices)}, got {args.devices}")
      devices = devices[:args.devices]
    items = load_items(args.data, args.data_dir, trimap_prefix=args.trimap_prefix,
                       count=args.count)
    model, variables = checkpointing.load_model_checkpoint(args.checkpoint)
    run_info = {"checkpoint": str(args.checkpoint.resolve()), "data": args.data,
                "data_dir": None if args.data_dir is None else str(pathlib.Path(
                    args.data_dir).resolve()),
                "trimap_prefix": args.trimap_prefix if args.data == "alphamatting" else None,
                "count": args.count if args.data == "synthetic" else None}
    summary = evaluate(model, variables, items, args.out, devices=devices,
                       batch_per_device=args.batch_per_device, resume=args.resume,
                       run_info=run_info, progress=not args.no_progress)
  except (ValueError, FileNotFoundError) as error:
    sys.exit(f"error: {error}")
  except OSError as error:  # a read-only or full --out
    sys.exit(f"error: {predict.describe_os_error(error, args.out)}")
  if not distributed.is_lead():
    return
  print(format_table(summary))
  if summary["no_unknown"]:
    print(f"MSE mean leaves out {len(summary['no_unknown'])} images without unknown pixels: "
          f"{', '.join(summary['no_unknown'][:5])}")
  if summary["scored"] and summary["unscored"]:
    print(f"not scored (no ground-truth alpha): {len(summary['unscored'])} images: "
          f"{', '.join(summary['unscored'][:5])}" + (" ..." if len(summary["unscored"]) > 5
                                                   else ""))
  print(f"{summary['images']} images ({summary['images'] - summary['scored']} without ground "
        f"truth) in {args.out}; {summary['compilations']} compilations, "
        f"{summary['seconds']:.1f} s on {len(devices)} device(s)"
        + (f" in each of {jax.process_count()} processes" if jax.process_count() > 1 else ""))


if __name__ == "__main__":
  main()
