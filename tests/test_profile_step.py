"""benchmarks/profile_step.py: HLO parsing, trace attribution, and the toy-size profile."""

import gzip
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from a2u_jax import ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import profile_step  # noqa: E402


def test_a_traced_function_is_attributed_by_its_named_scopes(tmp_path):
  """Reassembly forward and both cotangents, pooling and a convolution, each found in a
  real CPU trace under its group, and nothing left unmatched."""
  def loss(features, kernels, image, weights):
    up = ops.reassemble_up(features, kernels, kernel_size=3)
    pooled = ops.adaptive_avg_pool(up, 6)
    conv = jax.lax.conv_general_dilated(image, weights, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(up ** 2) + jnp.sum(pooled) + jnp.sum(jnp.tanh(conv))

  keys = jax.random.split(jax.random.key(0), 4)
  args = (jax.random.normal(keys[0], (2, 16, 16, 32)),
          jax.random.normal(keys[1], (2, 32, 32, 9)),
          jax.random.normal(keys[2], (2, 32, 32, 8)),
          jax.random.normal(keys[3], (3, 3, 8, 8)))
  step = jax.jit(jax.grad(loss, argnums=(0, 1, 3))).lower(*args).compile()
  jax.block_until_ready(step(*args))
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(2):
      jax.block_until_ready(step(*args))
  trace_file = next(tmp_path.glob("**/perfetto_trace.json.gz"))
  with gzip.open(trace_file) as handle:
    trace = json.load(handle)
  instructions = profile_step.parse_hlo(step.as_text())
  groups = {i["group"] for i in instructions.values()}
  assert {"reassembly forward", "kernel cotangent", "feature cotangent",
          "generator pooling", "convolutions"} <= groups
  result = profile_step.breakdown(trace, instructions, steps=2)
  for group in ("reassembly forward", "kernel cotangent", "feature cotangent",
                "generator pooling"):
    assert result["ms"][group] > 0, (group, result)
  assert result["ms"]["per-sample encoding"] == 0 and result["ms"]["GroupNorm"] == 0
  assert result["unmatched_ms"] < 0.05 * sum(result["ms"].values()), result["top_unmatched"]


def test_groups_from_op_names():
  group = profile_step.scope_group
  assert group("jit(f)/transpose(jvp(MattingNet))/up2/a2u_kernel_cotangent/while/body/dot") \
      == "kernel cotangent"
  assert group("jit(f)/jvp(MattingNet)/down0/generator/norm_u/reduce_sum") == "GroupNorm"
  assert group("jit(f)/jvp(MattingNet)/down0/generator/mix_up/dot_general") \
      == "other resampler ops"
  assert group("jit(f)/jvp(MattingNet)/up3/jit(_resize)/mul") == "other resampler ops"
  assert group("jit(f)/jvp(MattingNet)/stem/conv/conv_general_dilated", "convolution") \
      == "convolutions"
  assert group("jit(f)/jvp(MattingNet)/stem/bn/mul", "multiply") == "the rest"


@pytest.mark.slow  # two training-step compilations in subprocesses (~2-3 min on two cores)
def test_profile_step_prints_the_breakdown_at_toy_size(tmp_path):
  out_json = tmp_path / "profile.json"
  result = subprocess.run(
      [sys.executable, "benchmarks/profile_step.py", "--crop", "32", "--batch", "2",
       "--steps", "1", "--warmup", "1", "--out", str(out_json)],
      cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  for group in profile_step.GROUPS:
    assert f"| {group} |" in result.stdout
  assert "| step wall time (untraced, best) |" in result.stdout
  rows = {r["variant"]: r for r in json.loads(out_json.read_text())["rows"]}
  share, baseline = rows["share"], rows["baseline"]
  for group in ("generator pooling", "per-sample encoding", "GroupNorm",
                "reassembly forward", "kernel cotangent", "feature cotangent"):
    assert share["ms"][group] > 0 and baseline["ms"][group] == 0, group
  for row in (share, baseline):
    total = sum(row["ms"].values())
    assert row["ms"]["convolutions"] > 0 and row["unmatched_ms"] < 0.05 * total
