"""One prepared accelerator check: the Pallas kernels, the training step, the JAX input
pipeline and train.py, in one command (under 10 minutes on one H100 or H200).

    python benchmarks/device_check.py [--out device_check.json] [--budget-s 540]
    python benchmarks/device_check.py --quick     # the same code at toy sizes (CPU)
    python benchmarks/device_check.py --sections reassembly inference   # the other sections
    python benchmarks/device_check.py --profile --sections profile   # only the profile

Needs no TensorFlow (the accelerator machines have JAX, Flax, Optax, Orbax and PyTorch).
The default sections are train, kernels, pipeline and trainpy, in that order, with the
training step in float32 and bfloat16 for A2U share and the baseline. Each row runs even
when an earlier one failed; rows left once --budget-s is spent are reported as skipped.
Sections:
  1. reassembly: up/down forward and forward+backward of `a2u_jax.ops` for the
     benchmarks/reassembly.py cases and the same at 256 channels, beside the memory floors
     (nearest 2x upsampling, 2x2 average pooling);
  2. the training step of train.py (jitted shard_map over one device, float32, Adam) for
     A2U share, A2U unshare and the baseline at the paper's setting (512x512 crops, batch
     16): step time, images/s, compile time, peak device memory, and model FLOPs
     utilisation (XLA's FLOP count / step time / the device's peak from PEAK_TFLOPS);
  3. the same step of the PyTorch transcription (benchmarks/network.py, the authors'
     architecture with F.unfold reassembly) on the same device, with the ratio;
  4. network inference, A2U and baseline, 512x512 and 1024x1024, float32 and bfloat16;
  5. with --profile: the per-operation breakdown of the A2U and baseline training steps
     (benchmarks/profile_step.py) at the training section's size, float32 and bfloat16;
  6. kernels: the reassembly's Pallas kernels (implementation="pallas",
     a2u_jax/pallas_reassembly.py): the kernel tests on this device (pytest in a child
     process: tests/test_pallas_reassembly.py, the Pallas cases of tests/test_ops.py and
     the network's float64 gradients of tests/test_reference.py), forward and
     forward+backward times beside XLA's ("slices") for the reassembly section's cases,
     and the A2U training step with each beside the baseline's (the train section's
     float32 rows where it ran);
  7. pipeline: the JAX input pipeline's device-side augmentation beside the A2U step and
     the whole pipeline's samples/s with 4 host threads (benchmarks/pipeline_check.py);
  8. trainpy: train.py with --config.data.pipeline=jax on the shipped photographs
     enlarged 2x, once uninterrupted and once killed with SIGKILL after its first
     checkpoint and resumed: the same losses, and best_model/ written.
Each training row runs in its own process, so its peak memory is its own and an
out-of-memory error stays in its row. Prints a markdown table per section and writes
them all to --out as JSON (complete when it appears).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import pathlib
import sys
import time
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
# Allocate device memory as it is used (not 75% up front), so that the rows in child
# processes get the whole device and the peaks are each row's own.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import profile_step  # noqa: E402  (benchmarks/profile_step.py)
import pipeline_check  # noqa: E402  (benchmarks/pipeline_check.py)
import reassembly  # noqa: E402  (benchmarks/reassembly.py)
import train_step  # noqa: E402  (benchmarks/train_step.py)
from a2u_jax import ops  # noqa: E402

# Dense peak TFLOP/s per device kind (vendor data sheets), by the precision XLA runs a
# float32 step's convolutions and matmuls in at its default precision (TF32 on NVIDIA
# Ampere and later, bfloat16 passes on TPU) and for bfloat16.
PEAK_TFLOPS = {
    "H200": {"float32": 494.7, "bfloat16": 989.4},
    "H100 80GB HBM3": {"float32": 494.7, "bfloat16": 989.4},  # SXM
    "H100 PCIe": {"float32": 378.0, "bfloat16": 756.0},
    "H100": {"float32": 494.7, "bfloat16": 989.4},
    "A100": {"float32": 156.0, "bfloat16": 312.0},
    "L4": {"float32": 60.0, "bfloat16": 121.0},
    "TPU v4": {"float32": 275.0, "bfloat16": 275.0},
    "TPU v5 lite": {"float32": 197.0, "bfloat16": 197.0},
    "TPU v5": {"float32": 459.0, "bfloat16": 459.0},
    "TPU v6 lite": {"float32": 918.0, "bfloat16": 918.0},
}


@dataclasses.dataclass(frozen=True)
class Plan:
  """Sizes of one run: the full accelerator plan or the --quick toy plan."""
  reassembly_cases: tuple
  train_variants: tuple
  train_crop: int
  train_batch: int
  inference_sizes: tuple
  repeats: int


def _with_channels(case: reassembly.Case, channels: int) -> reassembly.Case:
  name = case.name.replace(f"{case.features[3]}ch", f"{channels}ch")
  return dataclasses.replace(case, name=name, features=case.features[:3] + (channels,))


FULL = Plan(
    reassembly_cases=tuple(reassembly.CASES[:2]) + tuple(
        _with_channels(c, 256) for c in reassembly.CASES[:2]),
    # unshare (the generator's widths only) runs with --variants share unshare baseline.
    train_variants=("share", "baseline"), train_crop=512, train_batch=16,
    inference_sizes=(512, 1024), repeats=5)
QUICK = Plan(
    reassembly_cases=tuple(reassembly.QUICK_CASES[:2]),
    # unshare differs from share only in the generator's widths; each variant's compile
    # costs ~40 s on a 2-core CPU.
    train_variants=("share", "baseline"), train_crop=32, train_batch=2,
    inference_sizes=(32,), repeats=2)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The data-sheet peak for a device kind (longest matching name), None if unknown."""
  matches = [name for name in PEAK_TFLOPS if name.lower() in device_kind.lower()]
  if not matches:
    return None
  return PEAK_TFLOPS[max(matches, key=len)][dtype]


def environment() -> dict[str, Any]:
  import flax
  import jaxlib

  device = jax.devices()[0]
  info = {"device": device.device_kind, "platform": device.platform,
          "devices": jax.device_count(), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "flax": flax.__version__}
  try:
    import torch
    info["torch"] = torch.__version__
    info["torch_device"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                            else "cpu")
  except ImportError:
    info["torch"] = None
  return info


# ------------------------------------------------------------------ 1. reassembly


def reassembly_rows(plan: Plan) -> list[dict]:
  rows = []
  for case in plan.reassembly_cases:
    measured = reassembly.jax_rows(case, plan.repeats, (ops.DEFAULT_IMPLEMENTATION,))
    default = next(r for r in measured if r["name"].endswith("(default)"))
    floor = measured[-1]
    rows.append({"case": case.name, "forward_ms": default["fwd"],
                 "forward_backward_ms": default["fb"],
                 "backward_ratio": default["fb"] / default["fwd"],
                 "floor": floor["name"].removeprefix("floor: "),
                 "floor_forward_ms": floor["fwd"],
                 "forward_vs_floor": default["fwd"] / floor["fwd"]})
  return rows


# -------------------------------------------------------------- 2. training step


def jax_train_row(variant: str, crop: int, size: int, repeats: int,
                  dtype: str = "float32") -> dict:
  """train.py's step of one network variant (benchmarks/train_step.py) with config.dtype
  `dtype`, with its MFU."""
  row = train_step.jax_row(crop, size, repeats, variant, dtype=dtype)
  seconds, flops = row["seconds"], row["flops"]
  tflops = peak_tflops(row["device_kind"], dtype)
  return {"row": _train_label(f"a2u_jax {variant}", dtype), "step_ms": 1e3 * seconds,
          "images_per_s": size / seconds,
          "compile_s": row["compile"], "peak_memory_gb": row["peak_device_gb"],
          "tflop_per_step": flops / 1e12,
          "mfu": flops / seconds / (tflops * 1e12) if tflops and flops else None,
          "loss": row["loss"]}


def _train_label(name: str, dtype: str) -> str:
  return name if dtype == "float32" else f"{name} {dtype}"


def torch_train_row(crop: int, size: int, repeats: int, dtype: str = "float32") -> dict:
  """The PyTorch transcription's training step (A2U share) on the same device; bfloat16
  under torch.autocast."""
  import torch

  row = train_step.torch_row(crop, size, repeats,
                             "cuda" if torch.cuda.is_available() else "cpu",
                             autocast=dtype == "bfloat16")
  name = f"{row['name']} A2U share (F.unfold)" + (" autocast" if dtype == "bfloat16" else "")
  return {"row": _train_label(name, dtype), "step_ms": 1e3 * row["seconds"],
          "images_per_s": size / row["seconds"], "compile_s": None,
          "peak_memory_gb": row["peak_device_gb"], "tflop_per_step": None, "mfu": None}


def _in_child(function, *args) -> dict:
  """Runs a row in a fresh process (its own device memory peak; errors stay in the row)."""
  context = multiprocessing.get_context("spawn")
  with context.Pool(1) as pool:
    try:
      return pool.apply(function, args)
    except Exception as error:
      return {"error": f"{type(error).__name__}: {error}"[:300]}


# ------------------------------------------------------------------- 4. inference


def inference_rows(plan: Plan, deadline: float) -> list[dict]:
  from a2u_jax import models

  rows = []
  rng = np.random.default_rng(0)
  a2u = jax.jit(models.a2u_matting().init)(jax.random.key(0), jnp.zeros((1, 32, 32, 4)))
  # The baseline is the A2U network without its four kernel generators.
  variables_of = {"A2U": a2u, "baseline": {
      collection: {k: v for k, v in tree.items() if not k.startswith("down")}
      for collection, tree in a2u.items()}}
  for size in plan.inference_sizes:
    x = rng.normal(size=(1, size, size, 4)).astype(np.float32)
    x[..., 3] = rng.choice([0.0, 0.5, 1.0], size=(1, size, size))
    for name, build in (("A2U", models.a2u_matting), ("baseline", models.baseline_matting)):
      variables = variables_of[name]
      for dtype in ("float32", "bfloat16"):
        label = {"model": name, "size": size, "dtype": dtype}
        if time.perf_counter() > deadline:
          rows.append(label | {"skipped": "time budget spent"})
          continue
        model = build(dtype=getattr(jnp, dtype))
        inputs = jnp.asarray(x, getattr(jnp, dtype))
        apply = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
        start = time.perf_counter()
        compiled = apply.lower(variables, inputs).compile()
        compile_s = time.perf_counter() - start
        seconds = 1e-3 * reassembly.best_ms(
            lambda: jax.block_until_ready(compiled(variables, inputs)), plan.repeats)
        rows.append(label | {"ms": 1e3 * seconds, "images_per_s": 1 / seconds,
                             "compile_s": compile_s})
        _progress(f"inference: {rows[-1]}")
  return rows


# ------------------------------------------------------------------------ report


def _cell(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
  env = report["environment"]
  lines = [f"# Device check: {env['device']} ({env['platform']}), jax {env['jax']}, "
           f"jaxlib {env['jaxlib']}, flax {env['flax']}, torch {env['torch']}",
           f"\nplan: {report['plan']}; total {report['seconds']:.0f} s ("
           + ", ".join(f"{k} {v:.0f} s" for k, v in report["section_seconds"].items())
           + ")\n"]
  if report["reassembly"]:
    lines += ["## Reassembly (float32, default implementation)\n",
              "| case | fwd ms | fwd+bwd ms | fwd+bwd / fwd | floor | floor fwd ms "
              "| fwd / floor |", "|---|---:|---:|---:|---|---:|---:|"]
  for r in report["reassembly"]:
    lines.append(f"| {r['case']} | {r['forward_ms']:.3f} | {r['forward_backward_ms']:.3f} | "
                 f"{r['backward_ratio']:.2f} | {r['floor']} | {r['floor_forward_ms']:.3f} | "
                 f"{r['forward_vs_floor']:.2f} |")
  train = report["train"]
  if train["rows"]:
    lines += [f"\n## Training step ({train['crop']}x{train['crop']} crops, batch "
              f"{train['batch']}, {', '.join(train.get('dtypes', ['float32']))}, one "
              f"device)\n",
              "| implementation | step ms | images/s | compile s | peak memory GB "
              "| TFLOP/step | MFU |", "|---|---:|---:|---:|---:|---:|---:|"]
  for r in train["rows"]:
    if "error" in r or "skipped" in r:
      lines.append(f"| {r['row']} | {r.get('error') or r['skipped']} | | | | | |")
      continue
    lines.append(f"| {r['row']} | {r['step_ms']:.1f} | {r['images_per_s']:.2f} | "
                 f"{_cell(r['compile_s'], '.1f')} | {_cell(r['peak_memory_gb'], '.2f')} | "
                 f"{_cell(r['tflop_per_step'], '.3f')} | {_cell(r['mfu'], '.1%')} |")
  texts = {"a2u_over_baseline_step": "A2U share step / baseline step",
           "ours_over_torch_images_per_s": "a2u_jax / PyTorch images/s (A2U share)",
           "a2u_over_baseline_step_bfloat16": "A2U share step / baseline step, bfloat16",
           "ours_over_torch_images_per_s_bfloat16":
               "a2u_jax bfloat16 / PyTorch autocast images/s (A2U share)"}
  for key, value in train["ratios"].items():
    if value is not None:
      text = texts.get(key, key.replace("_", " ").replace(" over ", " / "))
      lines.append(f"\n{text}: **{value:.2f}x**")
  if report["inference"]:
    lines += ["\n## Inference (batch 1)\n", "| model | size | dtype | ms | images/s "
              "| compile s |", "|---|---:|---|---:|---:|---:|"]
  for r in report["inference"]:
    if "skipped" in r:
      lines.append(f"| {r['model']} | {r['size']} | {r['dtype']} | {r['skipped']} | | |")
      continue
    lines.append(f"| {r['model']} | {r['size']} | {r['dtype']} | {r['ms']:.2f} | "
                 f"{r['images_per_s']:.1f} | {r['compile_s']:.1f} |")
  for key, value in report["inference_ratios"].items():
    lines.append(f"\n{key}: **{value:.2f}x**")
  if report.get("pipeline"):
    lines.append("\n## JAX input pipeline (benchmarks/pipeline_check.py)\n")
    lines.append(report["pipeline"].get("markdown", str(report["pipeline"])))
  if report.get("profile"):
    lines.append("\n## Training-step profile (benchmarks/profile_step.py)\n")
    lines += [table["markdown"] + "\n" for table in report["profile"]]
  if report.get("kernels"):
    lines += kernels_markdown(report["kernels"])
  if report.get("trainpy"):
    lines.append("\n## train.py on the JAX pipeline: SIGKILL and resume "
                 "(benchmarks/pipeline_check.py)\n")
    lines.append(report["trainpy"].get("markdown", str(report["trainpy"])))
  return "\n".join(lines)


def _ratio(numerator: dict | None, denominator: dict | None, key: str) -> float | None:
  if not numerator or not denominator or key not in numerator or key not in denominator:
    return None
  return numerator[key] / denominator[key]


def _write_atomically(path: pathlib.Path, text: str) -> None:
  """`text` into `path` through a staging file beside it, made with the umask's mode (a
  NamedTemporaryFile would be 0600)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = path.parent / f".{path.name}.{os.getpid()}"
  with open(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), "w") as handle:
    handle.write(text)
  os.replace(staging, path)


def _progress(message: str) -> None:
  """One line per finished row on stderr, so a run cut short still shows what it did."""
  print(f"[device_check] {message}", file=sys.stderr, flush=True)


def _train_section(plan: Plan, variants: tuple[str, ...], with_torch: bool, torch_version,
                   deadline: float, dtypes: tuple[str, ...] = ("float32",)) -> dict:
  rows = []
  for dtype in dtypes:
    for variant in variants:
      label = _train_label(f"a2u_jax {variant}", dtype)
      if time.perf_counter() > deadline:
        rows.append({"row": label, "skipped": "time budget spent"})
        continue
      rows.append({"row": label} | _in_child(
          jax_train_row, variant, plan.train_crop, plan.train_batch, plan.repeats, dtype))
      _progress(f"train: {rows[-1]}")
    label = _train_label("PyTorch", dtype)
    if not with_torch or torch_version is None:
      rows.append({"row": label, "skipped": "skipped: torch not installed or --no-torch"})
    elif time.perf_counter() > deadline:
      rows.append({"row": label, "skipped": "time budget spent"})
    else:
      rows.append({"row": label, "torch": True} | _in_child(
          torch_train_row, plan.train_crop, plan.train_batch, plan.repeats, dtype))
      _progress(f"train: {rows[-1]}")
  by_name = {row["row"]: row for row in rows}
  ratios = {}
  for dtype in dtypes:
    share = by_name.get(_train_label("a2u_jax share", dtype))
    baseline = by_name.get(_train_label("a2u_jax baseline", dtype))
    torch_row = next((r for r in rows if r.get("torch") and r["row"].endswith(
        " bfloat16" if dtype == "bfloat16" else "(F.unfold)")), None)
    suffix = "" if dtype == "float32" else f"_{dtype}"
    ratios[f"a2u_over_baseline_step{suffix}"] = _ratio(share, baseline, "step_ms")
    ratios[f"ours_over_torch_images_per_s{suffix}"] = _ratio(share, torch_row, "images_per_s")
  for variant in variants:
    if "bfloat16" in dtypes and "float32" in dtypes:
      ratios[f"{variant}_float32_over_bfloat16_step"] = _ratio(
          by_name.get(f"a2u_jax {variant}"), by_name.get(f"a2u_jax {variant} bfloat16"),
          "step_ms")
  return {"crop": plan.train_crop, "batch": plan.train_batch, "dtypes": list(dtypes),
          "rows": rows, "ratios": ratios}


def _inference_ratios(rows: list[dict]) -> dict[str, float]:
  ratios = {}
  for r in rows:
    if r["dtype"] == "bfloat16" and "ms" in r:
      f32 = next((o for o in rows if o["model"] == r["model"] and o["size"] == r["size"]
                  and o["dtype"] == "float32" and "ms" in o), None)
      if f32:
        ratios[f"{r['model']} {r['size']}: float32 ms / bfloat16 ms"] = f32["ms"] / r["ms"]
  return ratios


def profile_section(plan: Plan, deadline: float) -> list[dict]:
  """profile_step's breakdown of A2U share and the baseline, float32 then bfloat16."""
  tables = []
  for dtype in ("float32", "bfloat16"):
    if time.perf_counter() > deadline:
      tables.append({"dtype": dtype, "markdown": f"{dtype}: skipped, time budget spent"})
      continue
    rows = [{"variant": variant} | _in_child(
        profile_step.profile_variant, plan.train_crop, plan.train_batch, variant, dtype,
        3, 2, None) for variant in ("share", "baseline")]
    tables.append({"dtype": dtype, "rows": rows, "markdown": profile_step.markdown(rows)})
    _progress(f"profile {dtype}: done")
  return tables


# ---------------------------------------------------------------- 6. Pallas kernels

KERNEL_TESTS = ("tests/test_pallas_reassembly.py", "tests/test_ops.py",
                "tests/test_reference.py")
# The Pallas cases of the last two: the authors' kernels (every implementation) and the
# network's float64 gradients with the kernels on (a slow test).
KERNEL_TEST_FILTER = "pallas or test_pallas_reassembly"


def kernel_tests(timeout_s: float) -> dict:
  """pytest of the kernel tests on this machine's default device: passed, failed, tail."""
  import subprocess

  command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "-m", "slow or not slow", "-k", KERNEL_TEST_FILTER, *KERNEL_TESTS]
  try:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"command": " ".join(command[1:]), "passed": False,
            "summary": f"timed out after {timeout_s:.0f} s"}
  lines = (done.stdout + done.stderr).strip().splitlines()
  return {"command": " ".join(command[1:]), "passed": done.returncode == 0,
          "summary": lines[-1] if lines else "", "tail": "\n".join(lines[-30:])}


def kernel_train_row(variant: str, crop: int, size: int, repeats: int,
                     implementation: str) -> dict:
  """`jax_train_row` of A2U share with the reassembly's `implementation` (the config's
  resampler option, as `--config.model.resampler_options.implementation` sets it)."""
  from configs import a2u_matting

  get_config = a2u_matting.get_config

  def with_implementation():
    config = get_config()
    config.model.resampler_options.implementation = implementation
    return config

  a2u_matting.get_config = with_implementation   # this row's own child process
  return jax_train_row(variant, crop, size, repeats)


def kernels_section(plan: Plan, deadline: float, train_rows: list[dict] = ()) -> dict:
  """Section 6: the kernel tests, then XLA vs Pallas reassembly times, then the steps
  (the float32 A2U share and baseline rows of `train_rows` where the train section ran
  them at the same size)."""
  train_labels = {"A2U share, XLA reassembly": "a2u_jax share",
                  "baseline": "a2u_jax baseline"}
  from_train = {name: row for name, label in train_labels.items() for row in train_rows
                if row.get("row") == label and "step_ms" in row}
  tests = kernel_tests(max(60.0, deadline - time.perf_counter()))
  _progress(f"kernels: tests {tests['summary']}")
  rows = []
  for case in plan.reassembly_cases:
    if time.perf_counter() > deadline:
      rows.append({"case": case.name, "skipped": "time budget spent"})
      continue
    measured = {r["name"].split()[1]: r for r in
                reassembly.jax_rows(case, plan.repeats, ("slices", "pallas"))[:2]}
    xla, kernel = measured["slices"], measured["pallas"]
    rows.append({"case": case.name, "xla_forward_ms": xla["fwd"],
                 "xla_forward_backward_ms": xla["fb"], "pallas_forward_ms": kernel["fwd"],
                 "pallas_forward_backward_ms": kernel["fb"],
                 "xla_backward_ratio": xla["fb"] / xla["fwd"],
                 "pallas_backward_ratio": kernel["fb"] / kernel["fwd"]})
    _progress(f"kernels: {rows[-1]}")
  steps = {}
  for name, args in (("A2U share, XLA reassembly", ("share", "slices")),
                     ("A2U share, Pallas reassembly", ("share", "pallas")),
                     ("baseline", ("baseline", "slices"))):
    if name in from_train:
      steps[name] = from_train[name]
      continue
    if time.perf_counter() > deadline:
      steps[name] = {"skipped": "time budget spent"}
      continue
    variant, implementation = args
    steps[name] = _in_child(kernel_train_row, variant, plan.train_crop, plan.train_batch,
                            plan.repeats, implementation)
    _progress(f"kernels: step {name}: {steps[name]}")
  baseline = steps["baseline"]
  ratios = {f"{name} / baseline step": _ratio(steps[name], baseline, "step_ms")
            for name in steps if name != "baseline"}
  return {"tests": tests, "reassembly": rows, "steps": steps, "ratios": ratios,
          "crop": plan.train_crop, "batch": plan.train_batch}


def kernels_markdown(section: dict) -> list[str]:
  tests = section["tests"]
  lines = ["\n## Pallas kernels of the reassembly (float32)\n",
           f"kernel tests ({tests['command']}): "
           f"**{'passed' if tests['passed'] else 'FAILED'}** ({tests['summary']})\n",
           "| case | XLA fwd ms | XLA fwd+bwd ms | XLA fwd+bwd / fwd | Pallas fwd ms "
           "| Pallas fwd+bwd ms | Pallas fwd+bwd / fwd | XLA / Pallas fwd+bwd |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in section["reassembly"]:
    if "skipped" in r:
      lines.append(f"| {r['case']} | {r['skipped']} | | | | | | |")
      continue
    lines.append(f"| {r['case']} | {r['xla_forward_ms']:.3f} | "
                 f"{r['xla_forward_backward_ms']:.3f} | {r['xla_backward_ratio']:.2f} | "
                 f"{r['pallas_forward_ms']:.3f} | {r['pallas_forward_backward_ms']:.3f} | "
                 f"{r['pallas_backward_ratio']:.2f} | "
                 f"{r['xla_forward_backward_ms'] / r['pallas_forward_backward_ms']:.2f} |")
  lines += [f"\nTraining step ({section['crop']}x{section['crop']} crops, batch "
            f"{section['batch']}, float32):\n", "| step | ms | peak memory GB |",
            "|---|---:|---:|"]
  for name, r in section["steps"].items():
    if "step_ms" in r:
      lines.append(f"| {name} | {r['step_ms']:.1f} | {_cell(r['peak_memory_gb'], '.2f')} |")
    else:
      lines.append(f"| {name} | {r.get('error') or r.get('skipped')} | |")
  for key, value in section["ratios"].items():
    lines.append(f"\n{key}: **{_cell(value, '.2f')}x**")
  return lines


SECTIONS = ("reassembly", "train", "inference", "profile", "pipeline", "kernels", "trainpy")
DEFAULT_SECTIONS = ("train", "kernels", "pipeline", "trainpy")


def run(plan: Plan, budget_s: float, *, with_torch: bool = True,
        sections: tuple[str, ...] = DEFAULT_SECTIONS, variants: tuple[str, ...] | None = None,
        train_dtypes: tuple[str, ...] = ("float32", "bfloat16"),
        on_section: Callable[[dict], None] = lambda report: None) -> dict:
  """Runs the chosen sections; `on_section` gets the report after each one."""
  started = time.perf_counter()
  deadline = started + budget_s
  report: dict[str, Any] = {"environment": environment(),
                            "plan": "quick" if plan is QUICK else "full",
                            "section_seconds": {}, "reassembly": [],
                            "train": {"crop": plan.train_crop, "batch": plan.train_batch,
                                      "rows": [], "ratios": {}},
                            "inference": [], "inference_ratios": {}, "profile": []}
  for section in sections:
    begin = time.perf_counter()
    if section == "reassembly":
      report["reassembly"] = reassembly_rows(plan)
    elif section == "train":
      report["train"] = _train_section(plan, variants or plan.train_variants, with_torch,
                                       report["environment"]["torch"], deadline, train_dtypes)
    elif section == "profile":
      report["profile"] = profile_section(plan, deadline)
    elif section == "kernels":
      same_size = report["train"]["crop"] == plan.train_crop
      report["kernels"] = kernels_section(plan, deadline,
                                          report["train"]["rows"] if same_size else ())
    elif section == "trainpy":
      if time.perf_counter() > deadline:
        report["trainpy"] = {"markdown": "skipped: time budget spent"}
      else:
        report["trainpy"] = _in_child(pipeline_check.train_rows, plan is QUICK)
    elif section == "pipeline":
      # The JAX input pipeline beside the A2U step it feeds (benchmarks/pipeline_check.py,
      # whose train section runs train.py for minutes and so runs on its own).
      step = next((r for r in report["train"]["rows"]
                   if r.get("row") == _train_label("a2u_jax share", "float32")
                   and "step_ms" in r), None)
      report["pipeline"] = _in_child(pipeline_check.device_rows, plan is QUICK,
                                     step["step_ms"] if step else 163.9)
    else:
      report["inference"] = inference_rows(plan, deadline)
      report["inference_ratios"] = _inference_ratios(report["inference"])
    report["section_seconds"][section] = time.perf_counter() - begin
    report["seconds"] = time.perf_counter() - started
    _progress(f"{section} done in {report['section_seconds'][section]:.0f} s")
    on_section(report)
  return report


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="toy sizes (the same code; runs on a CPU in under 2 minutes)")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("device_check.json"))
  parser.add_argument("--budget-s", type=float, default=540.0,
                      help="skip the rows that would start after this many seconds")
  parser.add_argument("--no-torch", action="store_true", help="leave out the PyTorch row")
  parser.add_argument("--sections", nargs="+", choices=SECTIONS,
                      default=list(DEFAULT_SECTIONS),
                      help="which sections to run, in this order (default: "
                           f"{', '.join(DEFAULT_SECTIONS)})")
  parser.add_argument("--train-dtypes", nargs="+", choices=("float32", "bfloat16"),
                      default=["float32", "bfloat16"],
                      help="config.dtype of the training-step rows (bfloat16: mixed precision; "
                           "the PyTorch row then runs under torch.autocast(bfloat16))")
  parser.add_argument("--profile", action="store_true",
                      help="add the profile section (per-operation breakdown of the A2U and "
                           "baseline training steps, float32 and bfloat16)")
  parser.add_argument("--variants", nargs="+", choices=("share", "unshare", "baseline"),
                      help="training-step rows (default: share, baseline)")
  args = parser.parse_args(argv)
  if args.budget_s <= 0:
    parser.error(f"--budget-s must be > 0, got {args.budget_s}")
  if args.out.is_dir():
    parser.error(f"--out {args.out} is a folder; give a file name such as "
                 f"{args.out / 'device_check.json'}")
  def save(report: dict) -> None:
    _write_atomically(args.out, json.dumps(report | {"markdown": markdown(report)},
                                           indent=2) + "\n")

  sections = tuple(args.sections)
  if args.profile and "profile" not in sections:
    sections += ("profile",)
  report = run(QUICK if args.quick else FULL, args.budget_s, with_torch=not args.no_torch,
               sections=sections, train_dtypes=tuple(args.train_dtypes),
               variants=args.variants and tuple(args.variants),
               on_section=save)
  print(markdown(report), flush=True)
  print(f"\nwritten: {args.out}")


if __name__ == "__main__":
  main()
