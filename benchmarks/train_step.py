"""One training step (forward, the authors' loss, backward, Adam): A2U beside the baseline
network and beside PyTorch.

    python benchmarks/train_step.py [--cases 128x4 256x4] [--repeats 3] [--no-torch]

Rows per case (crop size x batch): the train step of train.py (jitted, float32, one
device) for the A2U network (share) and for the baseline network, and the PyTorch
transcription of the authors' A2U network from benchmarks/network.py in train mode with the
same loss and Adam parameter groups (CPU; skipped without torch). Each row runs in its own
process so its peak resident memory is its own. Columns: best-of-N step time, images/s,
the training step's compile time, the compile time of the network's inference
(`apply(..., train=False)`) at the same shape, peak RSS. Below each case: A2U's step over
the baseline's, and our A2U images/s over PyTorch's.
"""

from __future__ import annotations

import argparse
import multiprocessing
import pathlib
import resource
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def random_batch(crop: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  alpha = rng.random((size, crop, crop, 1)).astype(np.float32)
  fg = rng.random((size, crop, crop, 3)).astype(np.float32)
  bg = rng.random((size, crop, crop, 3)).astype(np.float32)
  trimap = rng.choice(np.array([0, 128, 255], np.uint8), (size, crop, crop, 1))
  return {"image": alpha * fg + (1 - alpha) * bg, "fg": fg, "bg": bg, "alpha": alpha,
          "trimap": trimap}


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def step_flops(lowered) -> float:
  """The step's FLOPs from XLA's cost analysis of the program before optimisation.

  The compiled executable's analysis is no count on GPU: convolutions become cuDNN
  custom calls there, which it counts as 0 FLOPs. Before optimisation the count is the
  same on every backend.
  """
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def compiled_step(crop: int, size: int, variant: str = "share", dtype: str = "float32"):
  """train.py's step (configs/a2u_matting.py on one device, `config.dtype=dtype`) of A2U
  share, unshare or the baseline, compiled: (compiled, lowered, state, batch, rng, model,
  compile seconds)."""
  sys.path.insert(0, str(ROOT))
  import jax

  from a2u_jax import parallel
  from a2u_jax.training import loop, state as state_lib
  from configs import a2u_matting

  config = a2u_matting.get_config()
  config.crop_size, config.batch_size, config.dtype = crop, size, dtype
  if variant == "unshare":
    config.model.resampler_options.share = False
  elif variant == "baseline":
    a2u_matting.use_resampler(config, "baseline")
  runtime = parallel.DataParallel([jax.devices()[0]])
  model = state_lib.model_from_config(config, axis_name=parallel.AXIS)
  state = runtime.put(state_lib.create_train_state(config, jax.random.PRNGKey(0), model))
  batch, rng = runtime.shard(random_batch(crop, size)), runtime.put(jax.random.PRNGKey(1))
  start = time.perf_counter()
  lowered = loop.make_train_step(config, runtime).lower(state, batch, rng)
  compiled = lowered.compile()
  return compiled, lowered, state, batch, rng, model, time.perf_counter() - start


def jax_row(crop: int, size: int, repeats: int, variant: str = "share",
            inference: bool = False, dtype: str = "float32") -> dict:
  """train.py's step (configs/a2u_matting.py on one device) of A2U share, unshare or the
  baseline in `dtype` (config.dtype): best step time, compile time, peak memory (device
  allocator where it keeps statistics, else XLA's plan), FLOPs and the last loss; with
  `inference`, also the compile time of the network's inference at the same shape."""
  import jax

  compiled, lowered, state, batch, rng, model, compile_s = compiled_step(
      crop, size, variant, dtype)
  device = jax.devices()[0]
  state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  inference_compile = None
  if inference:
    x = jax.numpy.zeros((size, crop, crop, 4), jax.numpy.float32)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    start = time.perf_counter()
    jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    inference_compile = time.perf_counter() - start
  peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
  if peak is None:
    memory = compiled.memory_analysis()
    peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
            + memory.output_size_in_bytes)
  return dict(seconds=min(times), compile=compile_s, inference_compile=inference_compile,
              rss=_peak_rss_gb(), peak_device_gb=peak / 1e9, flops=step_flops(lowered),
              loss=float(metrics["loss"]), device_kind=device.device_kind)


def torch_row(crop: int, size: int, repeats: int, device: str = "cpu",
              autocast: bool = False) -> dict:
  """The PyTorch transcription's training step (A2U share) on "cpu" or "cuda"; with
  `autocast`, its forward and loss under torch.autocast(bfloat16) (float32 parameters
  and optimiser, PyTorch's mixed precision, which our config.dtype="bfloat16" matches)."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import torch
  from network import TorchA2UMatting

  cuda = device == "cuda"
  if cuda:
    # JAX runs float32 convolutions and matmuls in TF32 at its default precision on
    # NVIDIA GPUs: PyTorch does the same here, so both compute at the same precision.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
  torch.manual_seed(0)
  model = TorchA2UMatting().train().to(device)
  groups = {"new": [], "encoder": []}
  for name, parameter in model.named_parameters():
    new = any(key in name for key in ("dconv", "pred", "short", "bconv", "bilinear"))
    groups["new" if new else "encoder"].append(parameter)
  optimizer = torch.optim.Adam([{"params": groups["new"]},
                                {"params": groups["encoder"], "lr": 0.01 / 100}], lr=0.01)
  batch = {k: torch.from_numpy(np.ascontiguousarray(np.transpose(v, (0, 3, 1, 2)))).to(device)
           for k, v in random_batch(crop, size).items()}
  mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
  inputs = torch.cat([(batch["image"] - mean) / std, batch["trimap"].float() / 255], 1)
  mask = (batch["trimap"] == 128).float()

  def forward():
    if autocast:
      with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16):
        return model(inputs).float()
    return model(inputs)

  def step():
    prediction = forward()
    count = mask.sum(dim=(2, 3)) + 1
    alpha_loss = (torch.sqrt(((prediction - batch["alpha"]) * mask) ** 2 + 1e-12)
                  .sum(dim=(2, 3)) / count).sum() / size
    composite = prediction * batch["fg"] + (1 - prediction) * batch["bg"]
    colour_loss = (torch.sqrt(((composite - batch["image"]) * mask) ** 2 + 1e-12)
                   .sum(dim=(2, 3)) / count).sum() / size
    loss = 0.5 * alpha_loss + 0.5 * colour_loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if cuda:
      torch.cuda.synchronize()

  step()  # warm-up (cuDNN autotuning on GPU)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return dict(seconds=min(times), compile=None, inference_compile=None, rss=_peak_rss_gb(),
              peak_device_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
              name=f"PyTorch {torch.__version__}")


def _in_child(function, *args) -> dict:
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(1) as pool:
    try:
      return pool.apply(function, args)
    except Exception as error:  # Shown in the table (e.g. out of memory), not fatal.
      return {"error": f"{type(error).__name__}: {error}"[:80]}


def _seconds(value: float | None) -> str:
  return "" if value is None else f"{value:.1f}"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", nargs="+", default=["128x4", "256x4"],
                      help="CROPxBATCH; crop a multiple of 16")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args(argv)
  cases = []
  for case in args.cases:
    crop, _, size = case.partition("x")
    if not (crop.isdigit() and size.isdigit()) or int(crop) % 16 or int(size) < 1:
      parser.error(f"--cases: expected CROPxBATCH with CROP a multiple of 16, got {case!r}")
    cases.append((int(crop), int(size)))
  try:
    import torch  # noqa: F401
    have_torch = not args.no_torch
  except ImportError:
    have_torch = False

  print("| case | implementation | step (s) | images/s | compile, train step (s) | "
        "compile, inference (s) | peak RSS (GB) |")
  print("|---|---|---|---|---|---|---|")
  for crop, size in cases:
    label = f"{crop}x{crop}, batch {size}"
    rows = {"A2U": _in_child(jax_row, crop, size, args.repeats, "share", True),
            "baseline": _in_child(jax_row, crop, size, args.repeats, "baseline", True)}
    if have_torch:
      rows["PyTorch"] = _in_child(torch_row, crop, size, args.repeats)
    else:
      reason = "--no-torch" if args.no_torch else "torch not installed"
      rows["PyTorch"] = {"error": f"skipped: {reason}"}
    names = {"A2U": "a2u_jax A2U (float32, jit)", "baseline": "a2u_jax baseline (float32, jit)",
             "PyTorch": rows["PyTorch"].pop("name", "PyTorch") + " A2U"}
    for key, r in rows.items():
      if "error" in r:
        print(f"| {label} | {names[key]} | {r['error']} | | | | |")
        continue
      print(f"| {label} | {names[key]} | {r['seconds']:.3f} | {size / r['seconds']:.2f} | "
            f"{_seconds(r['compile'])} | {_seconds(r['inference_compile'])} | "
            f"{r['rss']:.1f} |", flush=True)
    ours, baseline, theirs = rows["A2U"], rows["baseline"], rows["PyTorch"]
    if "error" not in ours and "error" not in baseline:
      print(f"| {label} | A2U step / baseline step (target <= 1.5) | "
            f"{ours['seconds'] / baseline['seconds']:.2f}x | | | | |")
    if "error" not in ours and "error" not in theirs:
      print(f"| {label} | ours / PyTorch images/s, A2U (target >= 1.0) | "
            f"{theirs['seconds'] / ours['seconds']:.2f}x | | | | |", flush=True)


if __name__ == "__main__":
  main()
