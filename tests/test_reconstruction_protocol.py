"""The reconstruction experiment's paper protocol (benchmarks/reconstruction.py): the
RecoverNet's shapes, its initialisation, the SGD schedule and the kernel-sharpness readout."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2u_jax import layers
from a2u_jax import resample_ops as rops
from configs import reconstruction as reconstruction_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark():
  spec = importlib.util.spec_from_file_location(
      "reconstruction_benchmark", ROOT / "benchmarks" / "reconstruction.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its Flax dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def _shapes(benchmark, operator, batch=2):
  model = benchmark.RecoverNet(operator)
  x = jnp.zeros((batch, 32, 32, 1))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  out, state = jax.eval_shape(
      lambda v: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
      variables)
  params = {"/".join(path): leaf.shape for path, leaf in
            jax.tree_util.tree_flatten_with_path(variables["params"])[0]
            for path in [tuple(k.key for k in path)]}
  outputs = {name: value["__call__"][0] for name, value in state["intermediates"].items()
             if "__call__" in value}
  return out, params, outputs


def test_recover_net_is_the_protocol_network_with_conv2_downsampling(benchmark):
  out, params, outputs = _shapes(benchmark, "nearest")
  assert out.shape == (2, 32, 32, 1)
  convs = {name: shape for name, shape in params.items() if name.endswith("_conv/kernel")}
  assert convs == {
      "enc1_conv/kernel": (3, 3, 1, 32), "down1_conv/kernel": (3, 3, 32, 32),
      "enc2_conv/kernel": (3, 3, 32, 64), "down2_conv/kernel": (3, 3, 64, 64),
      "enc3_conv/kernel": (3, 3, 64, 128), "down3_conv/kernel": (3, 3, 128, 128),
      "mid1_conv/kernel": (3, 3, 128, 256), "mid2_conv/kernel": (3, 3, 256, 128),
      "dec3_conv/kernel": (3, 3, 128, 64), "dec2_conv/kernel": (3, 3, 64, 32)}
  assert params["out/kernel"] == (3, 3, 32, 1)
  assert all(f"{stage}_bn/scale" in params for stage in
             ("enc1", "enc2", "enc3", "down1", "mid1", "mid2", "dec3", "dec2"))
  # Three 2x downsamplings: 32 -> 4 in the middle, then back up level by level.
  assert outputs["mid1_bn"].shape == (2, 4, 4, 256)
  assert outputs["mid2_bn"].shape == (2, 4, 4, 128)
  assert outputs["up3"].shape == (2, 8, 8, 128)
  assert outputs["up2"].shape == (2, 16, 16, 64)
  assert outputs["up1"].shape == (2, 32, 32, 32)


@pytest.mark.parametrize("operator", ["max_unpool", "a2u", "indexnet"])
def test_paired_operators_replace_the_conv2_downsampling(benchmark, operator):
  out, params, outputs = _shapes(benchmark, operator)
  assert out.shape == (2, 32, 32, 1)
  assert not {"down1_conv", "down2_conv", "down3_conv"} & {name.split("/")[0] for name in params}
  assert outputs["mid1_bn"].shape == (2, 4, 4, 256)
  assert outputs["up1"].shape == (2, 32, 32, 32)


def test_protocol_initialisation_draws_conv_and_batchnorm_weights_only(benchmark):
  ones = jnp.ones
  variables = {
      "params": {"conv": {"kernel": ones((3, 3, 64, 64)), "bias": ones(64)},
                 "dense": {"kernel": ones((128, 64))},
                 "bn": {"scale": ones(4096), "bias": ones(4096)},
                 "group_norm": {"scale": 3 * ones(8), "bias": 2 * ones(8)}},
      "batch_stats": {"bn": {"mean": ones(4096), "var": ones(4096)}}}
  fresh = benchmark.protocol_initialisation(variables, jax.random.key(0), 0.02)
  params = fresh["params"]
  assert abs(float(jnp.std(params["conv"]["kernel"])) - 0.02) < 0.001
  assert abs(float(jnp.mean(params["conv"]["kernel"]))) < 0.001
  assert abs(float(jnp.std(params["dense"]["kernel"])) - 0.02) < 0.001
  np.testing.assert_array_equal(params["conv"]["bias"], 0)
  assert abs(float(jnp.mean(params["bn"]["scale"])) - 1) < 0.002
  assert abs(float(jnp.std(params["bn"]["scale"])) - 0.02) < 0.002
  np.testing.assert_array_equal(params["bn"]["bias"], 0)
  np.testing.assert_array_equal(params["group_norm"]["scale"], 3)  # not a BatchNorm
  np.testing.assert_array_equal(params["group_norm"]["bias"], 2)
  assert fresh["batch_stats"] is variables["batch_stats"]


def test_paper_schedule_decays_tenfold_at_epochs_50_70_85(benchmark):
  config = reconstruction_config.get_config("paper")
  assert (config.batch_size, config.epochs, config.learning_rate, config.momentum) == (
      100, 100, 0.01, 0.9)
  schedule = benchmark.paper_learning_rate(config, steps_per_epoch=600)  # 60000 / 100
  expected = {0: 1e-2, 29_999: 1e-2, 30_000: 1e-3, 41_999: 1e-3, 42_000: 1e-4,
              50_999: 1e-4, 51_000: 1e-5, 59_999: 1e-5}
  for step, lr in expected.items():
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-6), step
  # Fewer epochs: the same fractions of the run.
  config.epochs = 1
  schedule = benchmark.paper_learning_rate(config, steps_per_epoch=20)
  assert [round(float(schedule(s)), 8) for s in (9, 10, 13, 14, 16, 17)] == [
      1e-2, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5]


class _Sower(nn.Module):
  taps: int

  @nn.compact
  def __call__(self, kernels):
    layers.sow_largest_tap(self, kernels, self.taps)
    return kernels


def test_largest_tap_reads_one_for_one_hot_and_one_over_taps_for_box_kernels():
  one_hot = jax.nn.one_hot(jnp.arange(12) % 9, 9).reshape(1, 2, 3, 2 * 9)[..., :9]
  box = jnp.full((1, 2, 3, 2 * 9), 1 / 9)  # two groups of nine taps
  for kernels, expected in ((one_hot, 1.0), (box, 1 / 9)):
    _, state = _Sower(9).apply({}, kernels, mutable=["intermediates"])
    record = state["intermediates"]["largest_tap"][0]
    assert float(record["mean"]) == pytest.approx(expected)
    assert float(record["uniform"]) == pytest.approx(1 / 9)
  # Nothing is recorded (or computed) unless the collection is mutable.
  assert _Sower(9).apply({}, box) is box


def test_bilinear_weights_of_a_dysample_position():
  weights = rops.bilinear_weights(jnp.array([[0.25, 1.0]]), jnp.array([[0.25, 2.0]]), 4, 4)
  np.testing.assert_allclose(weights, [[0.5625, 0.1875, 0.1875, 0.0625, 1, 0, 0, 0]])


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_readout_has_every_level_of_a2u_down_and_up_kernels(benchmark):
  model = benchmark.RecoverNet("a2u")
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 32, 32, 1)), jnp.float32)
  variables = benchmark.protocol_initialisation(jax.jit(model.init)(jax.random.key(0), x),
                                                jax.random.key(1), 0.02)
  _, state = jax.jit(lambda v: model.apply(v, x, mutable=["intermediates"]))(variables)
  readout = benchmark.kernel_sharpness(state["intermediates"])
  assert set(readout) == {(kind, taps, level) for kind, taps in (("up", 9), ("down", 36))
                          for level in (1, 2, 3)}
  for (kind, taps, level), (mean, uniform) in readout.items():
    assert uniform == pytest.approx(1 / taps)
    # With the protocol's N(0, 0.02) weights A2U starts as (nearly) a box filter.
    assert 1 / taps - 1e-6 <= float(mean) < 1.1 / taps, (kind, level)


@pytest.mark.slow  # two operators trained for one epoch of the synthetic set (~1 min)
def test_paper_protocol_command_prints_the_table_with_sharpness_columns(tmp_path):
  result = subprocess.run(
      [sys.executable, "benchmarks/reconstruction.py", "--protocol", "paper", "--epochs", "1",
       "--operators", "nearest", "a2u", "--train-images", "300", "--out", str(tmp_path)],
      cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "paper protocol (RecoverNet); 1 epochs of batch 100 (3 steps each)" in result.stdout
  assert ("| operator | parameters | best epoch | PSNR (dB) | SSIM | MAE | MSE | last PSNR "
          "| last SSIM | step (ms) | kernel | largest tap L1, start → end |") in result.stdout
  lines = result.stdout.splitlines()
  a2u_up = next(line for line in lines if line.startswith("| a2u |"))
  assert "| up 3x3 |" in a2u_up and a2u_up.rstrip(" |").endswith("0.111")
  assert any("| down 6x6 |" in line for line in lines)
  report = json.loads((tmp_path / "results.json").read_text())
  assert report["protocol"] == "paper" and report["config"]["epochs"] == 1
  nearest, a2u = report["rows"]
  assert nearest["kernels"] == [] and nearest["best"]["epoch"] == 1
  assert len(a2u["test_psnr_per_epoch"]) == 1
  assert {(k["kernel"], k["level"]) for k in a2u["kernels"]} == {
      (kind, level) for kind in ("up", "down") for level in (1, 2, 3)}
  assert all(0 < k["start"] <= 1 and 0 < k["end"] <= 1 for k in a2u["kernels"])
  assert (tmp_path / "reconstruction.png").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["reconstruction.png", "results.json"]


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_protocol_flags_are_checked():
  for args, message in ((["--protocol", "paper", "--steps", "3"], "--steps belongs to"),
                        (["--epochs", "2"], "--epochs belongs to"),
                        (["--protocol", "paper", "--epochs", "0"], "--epochs must be >= 1")):
    result = subprocess.run([sys.executable, "benchmarks/reconstruction.py", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
