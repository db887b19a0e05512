"""Training: the loss, the optimiser groups and schedule, the step (jit vs pmap), the NaN
guard, config errors, and resume after SIGKILL (train.py in a subprocess)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2u_jax import losses, parallel
from a2u_jax.training import loop, state as state_lib, steps
from configs import a2u_matting, smoke

ROOT = pathlib.Path(__file__).resolve().parents[1]
CROP = 32


def _reference_loss(pred, alpha, trimap, fg, bg, image):
  """The authors' weighted_loss, transcribed to NumPy (NCHW sums per image)."""
  mask = (trimap == 128).astype(np.float64)
  count = mask.sum(axis=(1, 2, 3)) + 1
  alpha_term = np.sqrt(((pred - alpha) * mask) ** 2 + 1e-12).sum(axis=(1, 2, 3)) / count
  composite = pred * fg + (1 - pred) * bg
  colour = np.sqrt(((composite - image) * mask) ** 2 + 1e-12).sum(axis=(1, 2, 3)) / count
  return 0.5 * alpha_term.mean() + 0.5 * colour.mean()


def test_loss_hand_case():
  # One image, 2 pixels: the first unknown (error 0.5 in alpha), the second known.
  pred = np.array([0.75, 0.2]).reshape(1, 1, 2, 1)
  alpha = np.array([0.25, 1.0]).reshape(1, 1, 2, 1)
  trimap = np.array([128, 255]).reshape(1, 1, 2, 1)
  fg = np.ones((1, 1, 2, 3))
  bg = np.zeros((1, 1, 2, 3))
  image = alpha * fg  # composite of the true alpha
  loss, parts = losses.matting_loss(*(jnp.asarray(a, jnp.float32) for a in
                                      (pred, alpha, trimap, fg, bg, image)))
  # Unknown pixel: |0.5| (+ eps); known pixel: the masked difference is 0 -> eps.
  expected_alpha = (np.sqrt(0.25 + 1e-12) + 1e-6) / 2
  np.testing.assert_allclose(parts["alpha_loss"], expected_alpha, rtol=1e-6)
  np.testing.assert_allclose(parts["composition_loss"], 3 * expected_alpha, rtol=1e-6)
  np.testing.assert_allclose(loss, 0.5 * expected_alpha + 0.5 * 3 * expected_alpha, rtol=1e-6)


def test_loss_matches_the_authors_formula_on_random_batches():
  rng = np.random.default_rng(0)
  shape = (3, 8, 9, 1)
  pred, alpha = rng.random(shape) * 1.2 - 0.1, rng.random(shape)
  trimap = rng.choice([0, 128, 255], shape)
  fg, bg = rng.random((3, 8, 9, 3)), rng.random((3, 8, 9, 3))
  image = alpha * fg + (1 - alpha) * bg
  loss, _ = losses.matting_loss(*(jnp.asarray(a, jnp.float32) for a in
                                  (pred, alpha, trimap, fg, bg, image)))
  np.testing.assert_allclose(loss, _reference_loss(pred, alpha, trimap, fg, bg, image),
                             rtol=1e-5)


def _config(**overrides):
  config = smoke.get_config()
  config.crop_size = CROP
  config.model.dropout_rate = 0.0  # identical dropout masks are impossible across layouts
  config.update(overrides)
  return config


def test_learning_rate_groups_and_schedule():
  config = _config(learning_rate=0.01, steps_per_epoch=100, decay_epochs=(2, 3))
  schedules = state_lib.learning_rate_schedules(config)
  for step, new in ((0, 0.01), (199, 0.01), (200, 0.001), (299, 0.001), (300, 1e-4)):
    np.testing.assert_allclose(schedules["new"](step), new, rtol=1e-6)
    np.testing.assert_allclose(schedules["encoder"](step), new / 100, rtol=1e-6)
  assert state_lib.parameter_group(("layer2_1", "conv1")) == "encoder"
  assert state_lib.parameter_group(("stem", "conv")) == "encoder"
  for name in ("down0", "aspp", "skip3", "stage2", "head", "head_out"):
    assert state_lib.parameter_group((name,)) == "new"


def _batch(rng, size):
  alpha = rng.random((size, CROP, CROP, 1)).astype(np.float32)
  fg = rng.random((size, CROP, CROP, 3)).astype(np.float32)
  bg = rng.random((size, CROP, CROP, 3)).astype(np.float32)
  trimap = rng.choice(np.array([0, 128, 255], np.uint8), (size, CROP, CROP, 1))
  return {"image": alpha * fg + (1 - alpha) * bg, "fg": fg, "bg": bg, "alpha": alpha,
          "trimap": trimap}


@pytest.fixture(scope="module")
def single_device():
  """The step in float64 (parameters float32): layouts that differ only in reduction order
  then agree to float64 rounding, whatever the CPU. Use it under jax.enable_x64(True).

  The step's wiring is under test (loss, optimiser, batch statistics, the device split),
  so it trains the baseline network, which compiles in half the time of A2U's; A2U's own
  gradients are checked against the authors' in test_reference.py."""
  with jax.enable_x64(True):
    config = _config(dtype="float64")
    a2u_matting.use_resampler(config, "baseline")
    model = state_lib.model_from_config(config)
    state = state_lib.create_train_state(config, jax.random.PRNGKey(0), model)
    traces = []

    def train_step(s, b, r):
      traces.append(b["image"].shape)
      return steps.train_step(s, b, r, learning_rates=state_lib.learning_rate_schedules(config))

  return config, state, jax.jit(train_step), traces


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_train_step_reduces_the_loss_and_reports_learning_rates(single_device):
  _, state, step, traces = single_device
  batch = _batch(np.random.default_rng(0), 4)
  rng = jax.random.PRNGKey(1)
  with jax.enable_x64(True):
    first, metrics = step(state, batch, rng)
    assert metrics["loss"].dtype == jnp.float64
    assert bool(metrics["finite"]) and int(first.step) == 1
    np.testing.assert_allclose(metrics["learning_rate/new"], 1e-3, rtol=1e-6)
    np.testing.assert_allclose(metrics["learning_rate/encoder"], 1e-5, rtol=1e-6)
    current = first
    for _ in range(3):
      current, later = step(current, batch, rng)
  assert float(later["loss"]) < float(metrics["loss"])
  # The state keeps its types (float32 statistics in float64 compute): one compilation.
  assert len(traces) == 1
  # Batch statistics are updated in train mode.
  assert not np.allclose(first.batch_stats["stem"]["bn"]["mean"],
                         state.batch_stats["stem"]["bn"]["mean"])


class _TwoLayerMattingNet(nn.Module):
  """The matting network's interface (4 input channels, alpha out, batch statistics,
  dropout, an encoder and a new parameter group) in two layers."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), name="stem")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return nn.sigmoid(nn.Conv(1, (1, 1), name="head")(x))


def test_non_finite_loss_leaves_the_state_unchanged():
  # The guard is the step's, whatever the network: a two-layer one compiles in a second
  # (the full networks' steps run in test_mixed_precision and the slow tests here).
  config = _config()
  model = _TwoLayerMattingNet()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, CROP, CROP, 4)))
  state = state_lib.TrainState.create(
      apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"],
      tx=state_lib.make_optimizer(config))
  step = jax.jit(steps.train_step)
  batch = _batch(np.random.default_rng(1), 4)
  finite_state, finite_metrics = step(state, batch, jax.random.PRNGKey(1))
  assert bool(finite_metrics["finite"]) and int(finite_state.step) == 1
  assert not np.allclose(finite_state.params["head"]["kernel"], state.params["head"]["kernel"])
  batch["fg"][0, 0, 0, 0] = np.nan
  batch["trimap"][0, 0, 0, 0] = 128
  new_state, metrics = step(state, batch, jax.random.PRNGKey(1))
  assert not bool(metrics["finite"])
  assert int(new_state.step) == int(state.step)
  chex.assert_trees_all_equal((new_state.params, new_state.batch_stats, new_state.opt_state),
                              (state.params, state.batch_stats, state.opt_state))


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_two_devices_give_the_update_of_one_device_with_the_whole_batch(single_device):
  config, state, step, _ = single_device
  if jax.device_count() < 2:
    pytest.skip("needs 2 (fake) devices; conftest sets XLA_FLAGS for 4")
  batch = _batch(np.random.default_rng(2), 4)
  rng = jax.random.PRNGKey(3)
  with jax.enable_x64(True):
    expected, expected_metrics = step(state, batch, rng)
    runtime = parallel.DataParallel(jax.devices()[:2])  # the training loop's parallelism
    model = state_lib.model_from_config(config, axis_name=parallel.AXIS)
    sharded_state = runtime.put(state.replace(apply_fn=model.apply))
    got, got_metrics = loop.make_train_step(config, runtime)(
        sharded_state, runtime.shard(batch), runtime.put(rng))
    got, expected = jax.device_get((got, expected))
  assert got.params["stem"]["conv"]["kernel"].dtype == np.float32
  # The step computes in float64, so the two layouts differ by float64 rounding in the
  # loss; the gradients pass through the float32 parameters' cotangents (rounded there,
  # then summed over the devices in float32), so they differ by float32 rounding.
  # (In float32 compute this grad_norm moved by 2.5e-4 between two CPU models.)
  np.testing.assert_allclose(got_metrics["loss"], expected_metrics["loss"], rtol=1e-12)
  np.testing.assert_allclose(got_metrics["grad_norm"], expected_metrics["grad_norm"],
                             rtol=1e-6)
  # Adam's moments are linear (mu) and quadratic (nu) in the gradient: equal moments mean
  # equal gradients, leaf by leaf; a missing or doubled device average moves them by 100%.
  # (The first Adam update itself, ~lr * sign(g), would turn rounding in near-zero
  # gradients into lr-sized differences: parameters are no fair comparison.)
  relative = jax.tree.map(
      lambda a, b: float(np.linalg.norm(np.ravel(a - b)) / (np.linalg.norm(np.ravel(b)) + 1e-30)),
      got.opt_state, expected.opt_state)
  worst = max(jax.tree.leaves(relative))
  assert worst < 1e-5, worst
  chex.assert_trees_all_close(got.batch_stats, expected.batch_stats, atol=1e-6, rtol=1e-6)


def test_pending_metrics_stay_on_device_until_read_and_name_the_first_bad_step():
  pending = loop.PendingMetrics()

  def metrics(loss):
    loss = jnp.float32(loss)
    return {"loss": loss, "grad_norm": loss * 2, "finite": jnp.isfinite(loss)}

  with jax.transfer_guard_device_to_host("disallow_explicit"):  # adding reads nothing
    for step, loss in ((1, 0.5), (2, 0.25)):
      pending.add(step, metrics(loss))
  assert len(pending) == 2
  assert pending.read(last_checkpoint=None) == {"loss": 0.25, "grad_norm": 0.5}
  assert len(pending) == 0
  for step, loss in ((3, 0.2), (4, np.nan), (5, np.inf), (6, 0.1)):
    pending.add(step, metrics(loss))
  with pytest.raises(loop.NonFiniteError,
                     match=r"step 4: the loss \(nan\).*the last one is step 2"):
    pending.read(last_checkpoint=2)
  with pytest.raises(ValueError, match="no step since the last read"):
    pending.read(last_checkpoint=2)


@pytest.mark.parametrize("override, message", [
    ({"batch_size": -1}, "config.batch_size must be a positive integer"),
    ({"batch_size": 3}, "config.batch_size=3 is not divisible by the 4 devices"),
    ({"crop_size": 40}, "config.crop_size must be a multiple of 16"),
    ({"dtype": "float16"}, "config.dtype must be"),
])
def test_bad_config_values_name_the_field(override, message):
  if "devices" in message and jax.device_count() != 4:
    pytest.skip("message assumes conftest's 4 fake devices")
  with pytest.raises(ValueError, match=message):
    loop.validate_config(_config(**override))


def test_resampler_from_the_config_and_its_errors(tmp_path):
  from a2u_jax import models
  from configs import resampler

  config = resampler.get_config("indexnet")
  config.model.resampler_options.index = "holistic"
  model = state_lib.model_from_config(config)
  assert (model.resampler, dict(model.resampler_options)) == (
      "indexnet", {"index": "holistic", "nonlinear": True, "context": True})
  # model.json round trip (what predict/evaluate rebuild from a training run).
  options = state_lib.model_options(config)
  assert json.loads(json.dumps(options)) == options
  assert models.build_model(json.loads(json.dumps(options))) == model
  config.model.resampler_options.index = "diagonal"
  with pytest.raises(ValueError, match="config.model.resampler_options: indexnet: `index` must"):
    loop.validate_config(config)
  config = smoke.get_config()
  config.model.resampler = "bicubic"
  with pytest.raises(ValueError, match="config.model.resampler must be one of baseline, "):
    loop.validate_config(config)
  config = resampler.get_config("carafe")
  config.model.resampler_options.kernel = 3
  with pytest.raises(ValueError, match="config.model.resampler_options: carafe: unknown"):
    loop.validate_config(config)
  config = smoke.get_config()
  config.model.resampler = "sapa"  # A2U's options left behind
  with pytest.raises(ValueError, match="unknown option.*configs/resampler.py:sapa lists them"):
    loop.validate_config(config)


def test_the_pipelines_are_tf_and_jax_and_numpy_says_what_replaced_it():
  config = _config()
  config.data.pipeline = "numpy"
  with pytest.raises(ValueError, match=r"^config.data.pipeline='numpy' was removed: use 'jax' "
                                       r"\(same synthetic source, no TensorFlow\)$"):
    loop.validate_config(config)
  config.data.pipeline = "torch"
  with pytest.raises(ValueError, match="config.data.pipeline must be one of tf, jax, got "):
    loop.validate_config(config)
  for pipeline in ("tf", "jax"):  # one declaration of the sources: the same options
    config.data.pipeline = pipeline
    loop.validate_config(config)
    config.data.source = "folder"
    with pytest.raises(ValueError, match="data source 'folder' does not take max_size, "
                                         "min_size, num_backgrounds, num_foregrounds, seed "
                                         r"\(it takes root, fg_dir"):
      loop.validate_config(config)
    config.data.source = "synthetic"


def test_missing_data_folder_and_unreadable_init_weights_are_named(tmp_path):
  config = _config()
  config.data.source = "folder"
  config.data.pipeline = "tf"
  config.data.options = {"root": str(tmp_path / "nowhere")}
  config.init.torchvision_resnet34 = str(tmp_path / "missing.pth")
  with pytest.raises(ValueError, match="config.init.torchvision_resnet34: cannot read"):
    loop.validate_config(config)
  config.init.torchvision_resnet34 = ""
  with pytest.raises(FileNotFoundError, match="fg_dir: folder .*nowhere/fg does not exist"):
    loop.train_and_evaluate(config, tmp_path / "run", progress=False)
  assert not (tmp_path / "run").exists()  # nothing written before the data is valid


def _every_config():
  """(label, config) for every file in configs/ that train.py takes, with its variants."""
  import importlib

  from a2u_jax import resamplers

  names = sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                 if p.stem not in ("__init__", "reconstruction"))
  for name in names:
    module = importlib.import_module(f"configs.{name}")
    if name == "resampler":
      for operator in resamplers.RESAMPLERS:
        yield f"resampler:{operator}", module.get_config(operator)
      yield "resampler:carafe,synthetic", module.get_config("carafe,synthetic")
    else:
      yield name, module.get_config()


def test_every_config_file_loads_and_validates(tmp_path):
  labels = []
  for label, config in _every_config():
    for key, value in config.data.options.items():
      if value is None:  # paths a user gives on the command line
        (tmp_path / key).mkdir(exist_ok=True)
        config.data.options[key] = str(tmp_path / key)
    loop.validate_config(config)
    assert loop.num_train_steps(config) > 0, label
    labels.append(label)
  assert {"a2u_matting", "baseline", "smoke", "unshare", "resampler:carafe"} <= set(labels)
  # The reconstruction experiment's config is benchmarks/reconstruction.py's, not train.py's.
  from configs import reconstruction
  assert reconstruction.get_config().image_size == 32


# In the slow set (make test's five minutes, issue 34); the loop's run and resume also run
# in the default set, in test_resuming_another_networks_training_state_says_so.
@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["tf", "jax"])
def test_train_and_evaluate_in_process_writes_checkpoints_the_model_and_metrics(
    tmp_path, pipeline):
  from a2u_jax import checkpointing

  config = smoke.get_config()
  config.data.pipeline = pipeline
  # The loop's wiring is under test, not the network: the baseline compiles in half the time.
  a2u_matting.use_resampler(config, "baseline")
  config.crop_size, config.num_train_steps = CROP, 2
  config.checkpoint_every = config.eval_every = 1
  config.image_summary_every = 0
  config.data.options.update(num_foregrounds=2, num_backgrounds=2, min_size=40, max_size=48)
  config.validation.options.update(count=1, min_size=32, max_size=40)
  workdir = tmp_path / "run"
  last = loop.train_and_evaluate(config, workdir, progress=False)
  assert np.isfinite(last["loss"]) and "validation/sad" in last
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2]
  assert [r["step"] for r in rows if "validation/sad" in r] == [1, 2]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
  assert any((workdir / "best").iterdir())
  # No half-written orbax folders; the run's lock file stays (it is released, not removed).
  assert sorted(p.name for p in workdir.iterdir() if p.name.startswith(".")) == [".lock"]
  model, variables = checkpointing.load_model_checkpoint(workdir / "model")
  best_model, best_variables = checkpointing.load_model_checkpoint(workdir / "best_model")
  assert best_model == model
  chex.assert_trees_all_equal_shapes(best_variables, variables)
  out = jax.jit(model.apply)(variables, jnp.zeros((1, CROP, CROP, 4)))
  chex.assert_shape(out, (1, CROP, CROP, 1))
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.slow  # two in-process runs, ~40 s on two cores
def test_resuming_another_networks_training_state_says_so(tmp_path):
  def config(resampler, steps):
    config = smoke.get_config()
    a2u_matting.use_resampler(config, resampler)
    config.crop_size, config.num_train_steps = CROP, steps
    config.eval_every = config.image_summary_every = 0
    config.data.options.update(num_foregrounds=2, num_backgrounds=2, min_size=40, max_size=48)
    return config

  run = tmp_path / "run"
  loop.train_and_evaluate(config("baseline", 1), run, progress=False)
  # The workdir's config.json records the network: the config says so first.
  with pytest.raises(ValueError,
                     match=r"steps compute \(config\.model\.resampler: \"baseline\""):
    loop.train_and_evaluate(config("pixel_shuffle", 2), run, progress=False)
  # Without it (a workdir of an earlier version), the checkpoint does. pixel_shuffle adds
  # down0..down3 and up0..up3, as A2U's format-2 modules differ from format 1's gen0..gen3.
  (run / "config.json").unlink()
  with pytest.raises(ValueError, match="checkpoint at step 1 is the training state of "
                                       "another network .*down0.*another --workdir"):
    loop.train_and_evaluate(config("pixel_shuffle", 2), run, progress=False)


# ------------------------------------------------------- train.py, end to end


def _train(workdir, cache, *extra):
  """Starts train.py on the smoke config (one CPU device, 6 steps, checkpoints every 2).

  It runs in the workdir's parent with the workdir given by name: a relative --workdir,
  as `make demo` passes one.
  """
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  command = [sys.executable, str(ROOT / "train.py"), "--config",
             str(ROOT / "configs" / "smoke.py"), "--workdir", workdir.name,
             f"--config.crop_size={CROP}", "--config.num_train_steps=6",
             "--config.checkpoint_every=2", "--config.eval_every=0",
             "--config.image_summary_every=0", f"--config.compilation_cache_dir={cache}",
             *extra]
  return subprocess.Popen(command, cwd=workdir.parent, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(process) -> str:
  out, err = process.communicate(timeout=600)
  assert process.returncode == 0, err[-3000:]
  return out + err


def _losses(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in records}


@pytest.mark.slow  # three train.py processes, ~3.5 min on two cores: run with -m slow
@pytest.mark.parametrize("pipeline", ["tf", "jax"])
def test_resume_after_sigkill_logs_the_same_losses(tmp_path, pipeline):
  cache = tmp_path / "xla_cache"
  flag = f"--config.data.pipeline={pipeline}"
  # The uninterrupted run and the one to be killed run side by side (two cores).
  straight = _train(tmp_path / "straight", cache, flag)
  killed = tmp_path / "killed"
  process = _train(killed, cache, flag)
  deadline = time.time() + 600
  while time.time() < deadline and process.poll() is None:
    folder = killed / "checkpoints"
    done = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
    if any(step >= 2 for step in done):
      break
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (killed / "model").exists()  # it never finished

  _finish(straight)
  expected = _losses(tmp_path / "straight")
  assert sorted(expected) == list(range(1, 7))
  assert (tmp_path / "straight" / "model" / "model.json").exists()

  log = _finish(_train(killed, cache, flag))
  assert "resuming" in log
  assert _losses(killed) == expected  # every step, bit for bit
