"""Where the training step's time goes: a per-operation breakdown of the A2U and baseline
steps from `jax.profiler` traces.

    python benchmarks/profile_step.py                           # 512x512, batch 16
    python benchmarks/profile_step.py --crop 32 --batch 2       # toy size (CPU, ~2 min)
    python benchmarks/profile_step.py --dtype bfloat16 --out profile.json

Each variant (A2U share, the baseline; --variants) runs in its own process: train.py's step
(benchmarks/train_step.py: configs/a2u_matting.py, one device, Adam) is compiled, run
--warmup times, then --steps times under `jax.profiler.trace(create_perfetto_trace=True)`.
The trace's operation events are matched by name to the compiled module's HLO instructions
(`compiled.as_text()`), and every instruction is put in a group by the op names in its
metadata (for a fusion, those of the instructions it fuses: the group most of them belong
to). The A2U groups come from the named scopes in `a2u_jax.ops` and the generator's
GroupNorm modules (`.../generator/norm_u`, `norm_v`):

  generator pooling    ops.adaptive_avg_pool (forward and gradient)
  per-sample encoding  ops.per_sample_depthwise (forward and gradient)
  GroupNorm            the generators' GroupNorm (forward and gradient)
  reassembly forward   ops.reassemble_up / reassemble_down forward
  kernel cotangent     their gradient with respect to the kernels
  feature cotangent    their gradient with respect to the features
  other resampler ops  the rest of the resampling modules (down0..3, up0..3): A2U's
                       generator mixing, softmax and kernel layout; the baseline's
                       bilinear upsampling
  convolutions         the network's convolutions (forward and gradient)
  the rest             everything else (batch norm, activations, layout copies, loss,
                       Adam, the non-finite guard)

Times are per step: the sum of the group's operation events over the traced steps divided
by --steps. On a GPU or TPU they are device (kernel) times on its streams; on the CPU they
are the times of the thunks on XLA's executor threads, which can overlap, so the sum can
exceed the step's wall time (printed beside it). "unmatched" is the time of operation
events that name no instruction of the module (e.g. library kernels the profiler does not
attribute): it says how much of the device time the table covers.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import multiprocessing
import os
import pathlib
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from a2u_jax import ops  # noqa: E402

VARIANTS = ("share", "unshare", "baseline")
DTYPES = ("float32", "bfloat16")
# (group, pattern in an instruction's op_name metadata), most specific first.
SCOPED_GROUPS = (
    ("kernel cotangent", re.escape(ops.KERNEL_COTANGENT_SCOPE)),
    ("feature cotangent", re.escape(ops.FEATURE_COTANGENT_SCOPE)),
    ("reassembly forward", re.escape(ops.REASSEMBLY_FORWARD_SCOPE)),
    ("per-sample encoding", re.escape(ops.ENCODING_SCOPE)),
    ("generator pooling", re.escape(ops.POOLING_SCOPE)),
    ("GroupNorm", r"/generator/norm_[uv]/"),
)
# Then, outside those: the resampling modules' other operations (A2U's generator mixing,
# softmax and kernel layout; the baseline's bilinear upsampling), and the convolutions.
RESAMPLER_OTHER, CONVOLUTIONS, REST = "other resampler ops", "convolutions", "the rest"
_RESAMPLER_MODULE = r"/(down|up)\d/"
GROUPS = tuple(name for name, _ in SCOPED_GROUPS) + (RESAMPLER_OTHER, CONVOLUTIONS, REST)
# Instructions that only hold others (their bodies' instructions have their own events),
# or move no data.
_CONTAINERS = {"while", "conditional", "call", "async-start", "async-done"}
# Trace events that are not operations: the executor's spans around them, pool markers.
_NOT_OPERATIONS = ("end: ", "ThreadpoolListener", "ThunkExecutor", "SlinkyThreadPool")
_TRIVIAL = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple"}

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s+=\s.*?\s([a-z][\w\-]*)\(")
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CONV_TARGET = re.compile(r'custom_call_target="[^"]*conv', re.I)


def scope_group(op_name: str, opcode: str = "", text: str = "") -> str:
  """The group of one HLO instruction from its op_name metadata (and opcode/line)."""
  for group, pattern in SCOPED_GROUPS:
    if re.search(pattern, op_name):
      return group
  if opcode == "convolution" or (opcode == "custom-call" and _CONV_TARGET.search(text)):
    return CONVOLUTIONS
  if re.search(_RESAMPLER_MODULE, op_name):
    return RESAMPLER_OTHER
  return REST


def parse_hlo(text: str) -> dict[str, dict]:
  """{instruction name: {"opcode", "group", "computation"}} for every instruction of an
  HLO module's text; a fusion's group is the most common group of the instructions it
  fuses (nested calls included), ties going to the more specific group."""
  computations: dict[str, list] = collections.defaultdict(list)
  current = None
  for line in text.splitlines():
    head = _COMPUTATION.match(line)
    if head and not line.startswith(" "):
      current = head.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      name, opcode = match.groups()
      op_name = _OP_NAME.search(line)
      computations[current].append({
          "name": name, "opcode": opcode, "calls": _CALLS.findall(line),
          "group": scope_group(op_name.group(1) if op_name else "", opcode, line)})

  def counts(computation: str, seen: frozenset = frozenset()) -> collections.Counter:
    total = collections.Counter()
    for instruction in computations.get(computation, ()):
      if instruction["opcode"] in _TRIVIAL:
        continue
      if instruction["calls"] and computation not in seen:
        for called in instruction["calls"]:
          total += counts(called, seen | {computation})
      else:
        total[instruction["group"]] += 1
    return total

  instructions = {}
  for computation, members in computations.items():
    for instruction in members:
      group = instruction["group"]
      if instruction["opcode"] == "fusion" and instruction["calls"]:
        fused = counts(instruction["calls"][0])
        if fused:
          group = max(fused, key=lambda g: (fused[g], -GROUPS.index(g)))
      instructions[instruction["name"]] = {"opcode": instruction["opcode"], "group": group,
                                           "computation": computation}
  return instructions


def _operation_threads(events: list[dict]) -> tuple[set, str]:
  """(set of (pid, tid) whose events are the module's operations, what they are)."""
  processes, threads = {}, {}
  for event in events:
    if event.get("ph") == "M" and event.get("name") == "process_name":
      processes[event["pid"]] = event["args"]["name"]
    elif event.get("ph") == "M" and event.get("name") == "thread_name":
      threads[(event["pid"], event["tid"])] = event["args"]["name"]
  devices = {pid for pid, name in processes.items()
             if re.search(r"/device:(GPU|TPU)", name) and "host" not in name.lower()}
  if devices:
    return {key for key in threads if key[0] in devices} | {
        (event["pid"], event["tid"]) for event in events
        if event.get("pid") in devices and "tid" in event}, "device streams"
  # The CPU runs thunks on XLA's client threads and its intra-op (Eigen) pool.
  executors = {key for key, name in threads.items() if name.startswith("tf_XLA")}
  return executors, "CPU time on XLA's threads"


def breakdown(trace: dict | list, instructions: dict[str, dict], steps: int) -> dict:
  """Per-step milliseconds by group from a trace-event (Perfetto JSON) trace."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  threads, source = _operation_threads(events)
  # GPU kernels are named after their instruction with "." and "-" made "_".
  aliases = {re.sub(r"[.\-]", "_", name): info for name, info in instructions.items()}
  per_group = collections.Counter()
  unmatched = collections.Counter()
  for event in events:
    if event.get("ph") != "X" or (event.get("pid"), event.get("tid")) not in threads:
      continue
    args = event.get("args") or {}
    name = args.get("hlo_op") or event["name"]
    instruction = instructions.get(name) or aliases.get(name)
    duration_ms = float(event.get("dur", 0.0)) / 1e3 / steps
    if instruction is None:
      if not name.startswith(_NOT_OPERATIONS):
        unmatched[name] += duration_ms
      continue
    if instruction["opcode"] in _CONTAINERS:
      continue
    per_group[instruction["group"]] += duration_ms
  return {"ms": {group: per_group.get(group, 0.0) for group in GROUPS},
          "unmatched_ms": sum(unmatched.values()),
          "top_unmatched": unmatched.most_common(5), "events_from": source}


def profile_variant(crop: int, size: int, variant: str, dtype: str, steps: int,
                    warmup: int, trace_dir: str | None) -> dict:
  """Compiles and traces one variant's step; its breakdown, step time and compile time."""
  import jax
  import train_step  # benchmarks/train_step.py

  compiled, _, state, batch, rng, _, compile_s = train_step.compiled_step(
      crop, size, variant, dtype)
  for _ in range(warmup):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready((state, metrics))
  folder = pathlib.Path(trace_dir or tempfile.mkdtemp(prefix="profile_step_")) / (
      f"{variant}_{dtype}_{crop}x{size}")
  start = time.perf_counter()
  with jax.profiler.trace(str(folder), create_perfetto_trace=True):
    for _ in range(steps):
      state, metrics = compiled(state, batch, rng)
      jax.block_until_ready((state, metrics))
  wall_ms = (time.perf_counter() - start) * 1e3 / steps
  times = []
  for _ in range(steps):  # untraced, for the step time without the profiler's overhead
    begin = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - begin)
  trace_file = max(folder.glob("**/perfetto_trace.json.gz"), key=os.path.getmtime)
  with gzip.open(trace_file) as handle:
    trace = json.load(handle)
  hlo = compiled.as_text()
  (folder / "module.hlo.txt").write_text(hlo)  # beside the trace, to look names up
  result = breakdown(trace, parse_hlo(hlo), steps)
  device = jax.devices()[0]
  return result | {"variant": variant, "dtype": dtype, "crop": crop, "batch": size,
                   "step_ms": 1e3 * min(times), "traced_step_ms": wall_ms,
                   "compile_s": compile_s, "device": device.device_kind,
                   "platform": device.platform, "trace": str(trace_file)}


def _in_child(function, *args) -> dict:
  context = multiprocessing.get_context("spawn")
  with context.Pool(1) as pool:
    try:
      return pool.apply(function, args)
    except Exception as error:  # shown in the table (e.g. out of memory), not fatal
      return {"error": f"{type(error).__name__}: {error}"[:300]}


def markdown(rows: list[dict]) -> str:
  """The breakdown table: one column pair per variant, A2U - baseline at the end."""
  ok = [r for r in rows if "error" not in r]
  first = ok[0] if ok else rows[0]
  lines = [f"### {first.get('device', '?')} ({first.get('platform', '?')}), "
           f"{first.get('crop')}x{first.get('crop')} crops, batch {first.get('batch')}, "
           f"{first.get('dtype')}; ms per step ({first.get('events_from', '')})\n"]
  header = "| group |" + "".join(f" {r['variant']} ms | {r['variant']} % |" for r in ok)
  align = "|---|" + "---:|---:|" * len(ok)
  by_variant = {r["variant"]: r for r in ok}
  difference = "share" in by_variant and "baseline" in by_variant
  if difference:
    header += " share - baseline ms |"
    align += "---:|"
  lines += [header, align]

  def row(label, values):
    cells = "".join(f" {v:.2f} | {100 * v / max(r['total_ms'], 1e-12):.1f} |"
                    for v, r in zip(values, ok))
    if difference:
      share, base = (values[[r["variant"] for r in ok].index(k)] for k in ("share", "baseline"))
      cells += f" {share - base:+.2f} |"
    return f"| {label} |{cells}"

  for r in ok:
    r["total_ms"] = sum(r["ms"].values())
  for group in GROUPS:
    lines.append(row(group, [r["ms"][group] for r in ok]))
  lines.append(row("**sum of operations**", [r["total_ms"] for r in ok]))
  lines.append(row("unmatched events", [r["unmatched_ms"] for r in ok]))
  lines.append("| step wall time (untraced, best) |" + "".join(
      f" {r['step_ms']:.2f} | |" for r in ok) + (
          f" {by_variant['share']['step_ms'] - by_variant['baseline']['step_ms']:+.2f} |"
          if difference else ""))
  for r in rows:
    if "error" in r:
      lines.append(f"\n{r['variant']}: {r['error']}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--crop", type=int, default=512, help="crop size (multiple of 16)")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["share", "baseline"])
  parser.add_argument("--dtype", choices=DTYPES, default="float32", help="config.dtype")
  parser.add_argument("--steps", type=int, default=3, help="traced steps")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--trace-dir", help="keep the traces here (default: a temporary folder)")
  parser.add_argument("--out", type=pathlib.Path, help="also write the rows and table as JSON")
  args = parser.parse_args(argv)
  if args.crop % 16 or args.crop <= 0 or args.batch < 1 or args.steps < 1 or args.warmup < 0:
    parser.error("--crop must be a positive multiple of 16, --batch and --steps >= 1, "
                 "--warmup >= 0")
  rows = []
  for variant in args.variants:
    row = {"variant": variant} | _in_child(profile_variant, args.crop, args.batch, variant,
                                           args.dtype, args.steps, args.warmup,
                                           args.trace_dir)
    done = row.get("error") or f"{row['step_ms']:.1f} ms/step"
    print(f"[profile_step] {variant}: {done}", file=sys.stderr, flush=True)
    rows.append(row)
  table = markdown(rows)
  print(table, flush=True)
  if args.out:
    args.out.write_text(json.dumps({"rows": rows, "markdown": table}, indent=2) + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
  main()
