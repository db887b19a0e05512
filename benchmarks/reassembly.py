"""Reassembly speed and memory: our implementations beside PyTorch's unfold formulation.

    python benchmarks/reassembly.py [--repeats 5] [--quick]

For each case prints forward and forward+backward wall time (best of --repeats, after a
warm-up/compile call) for every implementation in `a2u_jax.ops` (the Pallas kernels on
GPUs only: elsewhere they run in Pallas' interpret mode, minutes per case), for the PyTorch
`F.unfold` formulation (CARAFE's usual CPU fallback; "skipped" when torch is missing), and
for the memory floor of the same data movement in JAX (nearest 2x upsampling for up,
2x2 average pooling for down). Memory columns come from XLA's analysis of the compiled
forward+backward: temporaries next to the bytes of inputs (features, kernels, cotangent)
plus outputs (result and both cotangents).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from a2u_jax import ops

try:
  import torch
  import torch.nn.functional as F
except ImportError:  # The PyTorch rows are optional.
  torch = None


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  direction: str      # "up" or "down"
  features: tuple     # NHWC
  kernel_size: int

  @property
  def kernels(self) -> tuple:
    n, h, w, _ = self.features
    spatial = (2 * h, 2 * w) if self.direction == "up" else (h // 2, w // 2)
    return (n,) + spatial + (self.kernel_size**2,)

  @property
  def output(self) -> tuple:
    return self.kernels[:3] + (self.features[3],)


CASES = [
    Case("up 64ch 256->512 K3", "up", (1, 256, 256, 64), 3),
    Case("down 64ch 512->256 K6", "down", (1, 512, 512, 64), 6),
    Case("up small 64ch 32->64 K3", "up", (1, 32, 32, 64), 3),
    Case("down small 64ch 64->32 K6", "down", (1, 64, 64, 64), 6),
    Case("up batch16 64ch 64->128 K3", "up", (16, 64, 64, 64), 3),
    Case("down batch16 64ch 128->64 K6", "down", (16, 128, 128, 64), 6),
]
QUICK_CASES = [c for c in CASES if "small" in c.name]


def best_ms(fn, repeats: int) -> float:
  fn()  # warm-up / compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def _inputs(case: Case, seed: int = 0):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=case.features).astype(np.float32)
  kernels = rng.uniform(0.0, 1.0, size=case.kernels).astype(np.float32)
  cotangent = rng.normal(size=case.output).astype(np.float32)
  return features, kernels, cotangent


def measured_implementations() -> tuple[str, ...]:
  """The implementations worth timing on the default backend."""
  return tuple(i for i in ops.IMPLEMENTATIONS
               if i != "pallas" or jax.default_backend() == "gpu")


def jax_rows(case: Case, repeats: int,
             implementations: tuple[str, ...] | None = None) -> list[dict]:
  features, kernels, cotangent = (jnp.asarray(a) for a in _inputs(case))
  op = ops.reassemble_up if case.direction == "up" else ops.reassemble_down
  io_bytes = 4 * (2 * features.size + 2 * kernels.size + 2 * cotangent.size)
  rows = []
  for implementation in implementations or measured_implementations():
    fn = functools.partial(op, kernel_size=case.kernel_size, implementation=implementation)

    def forward_backward(f, m, ct, fn=fn):
      out, vjp = jax.vjp(fn, f, m)
      return (out,) + vjp(ct)

    forward = jax.jit(fn)
    both = jax.jit(forward_backward)
    fwd = best_ms(lambda: jax.block_until_ready(forward(features, kernels)), repeats)
    fb = best_ms(lambda: jax.block_until_ready(both(features, kernels, cotangent)), repeats)
    analysis = both.lower(features, kernels, cotangent).compile().memory_analysis()
    name = f"a2u_jax {implementation}"
    if implementation == ops.DEFAULT_IMPLEMENTATION:
      name += " (default)"
    rows.append(dict(name=name, fwd=fwd, fb=fb, temp=analysis.temp_size_in_bytes,
                     io=io_bytes))

  if case.direction == "up":
    def floor_fn(f):
      return jnp.repeat(jnp.repeat(f, 2, axis=1), 2, axis=2)
    floor_name = "floor: JAX nearest 2x"
  else:
    def floor_fn(f):
      n, h, w, c = f.shape
      return f.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    floor_name = "floor: JAX 2x2 avg pool"
  floor = jax.jit(floor_fn)
  rows.append(dict(name=floor_name,
                   fwd=best_ms(lambda: jax.block_until_ready(floor(features)), repeats),
                   fb=None, temp=None, io=None))
  return rows


def torch_unfold_reassemble(case: Case, features, kernels):
  """The op with F.unfold (NCHW), as CARAFE-style CPU fallbacks write it."""
  n, c, _, _ = features.shape
  k = case.kernel_size
  if case.direction == "up":
    h, w = features.shape[2:]
    patches = F.unfold(features, k, padding=(k - 1) // 2).view(n, c * k * k, h, w)
    patches = F.interpolate(patches, scale_factor=2, mode="nearest")
    patches = patches.view(n, c, k * k, 2 * h, 2 * w)
    return (patches * kernels.unsqueeze(1)).sum(dim=2)
  hh, ww = features.shape[2:]
  patches = F.unfold(features, k, padding=(k - 2) // 2, stride=2)
  patches = patches.view(n, c, k * k, hh // 2, ww // 2)
  return (patches * kernels.unsqueeze(1)).sum(dim=2)


def torch_row(case: Case, repeats: int) -> dict:
  if torch is None:
    return dict(name="PyTorch F.unfold", skipped="skipped: torch not installed")
  features, kernels, cotangent = (torch.from_numpy(np.ascontiguousarray(
      np.transpose(a, (0, 3, 1, 2)))) for a in _inputs(case))

  def forward():
    with torch.no_grad():
      torch_unfold_reassemble(case, features, kernels)

  def forward_backward():
    f = features.clone().requires_grad_(True)
    m = kernels.clone().requires_grad_(True)
    torch_unfold_reassemble(case, f, m).backward(cotangent)

  return dict(name=f"PyTorch {torch.__version__} F.unfold", fwd=best_ms(forward, repeats),
              fb=best_ms(forward_backward, repeats), temp=None, io=None)


def _fmt(value, spec):
  return "-" if value is None else format(value, spec)


def print_table(case: Case, rows: list[dict]) -> None:
  reference = next((r for r in rows if r["name"].startswith("PyTorch") and "fwd" in r), None)
  print(f"\n### {case.name}: features {case.features}, kernels {case.kernels} (NHWC, f32)\n")
  print("| implementation | fwd ms | fwd+bwd ms | fwd+bwd / fwd | torch fwd / fwd "
        "| temp MB | in+out MB | temp / in+out |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for row in rows:
    if "skipped" in row:
      print(f"| {row['name']} | {row['skipped']} | | | | | | |")
      continue
    ratio = row["fb"] / row["fwd"] if row["fb"] is not None else None
    speedup = reference["fwd"] / row["fwd"] if reference else None
    temp_ratio = row["temp"] / row["io"] if row["temp"] is not None else None
    print(f"| {row['name']} | {row['fwd']:.2f} | {_fmt(row['fb'], '.2f')} "
          f"| {_fmt(ratio, '.2f')} | {_fmt(speedup, '.1f')} "
          f"| {_fmt(row['temp'] and row['temp'] / 1e6, '.1f')} "
          f"| {_fmt(row['io'] and row['io'] / 1e6, '.1f')} | {_fmt(temp_ratio, '.2f')} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (best of)")
  parser.add_argument("--quick", action="store_true", help="only the small cases")
  args = parser.parse_args()
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  print(f"# Reassembly benchmark: {platform.processor() or platform.machine()}, "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"torch {torch.__version__ if torch else 'not installed'}")
  for case in (QUICK_CASES if args.quick else CASES):
    rows = jax_rows(case, args.repeats)
    rows.insert(len(rows) - 1, torch_row(case, args.repeats))
    print_table(case, rows)


if __name__ == "__main__":
  main()
