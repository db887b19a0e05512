"""The second sweep of bad inputs and faults: nothing lost, nothing hangs, nothing silently
wrong (issues 26 and 33). CLI cases run as subprocesses: exit status, one `error:` line, no
traceback, and nothing lost on disk."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from a2u_jax.training import loop
from a2u_jax.training import workdir as workdir_lib
from tests.test_bad_inputs import ROOT, _cli, _one_clear_line


def _snapshot(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file()}


# ------------------------------------------------------------------ workdir: one run


def _hold_lock(workdir: pathlib.Path) -> subprocess.Popen:
  """A process that claims `workdir` as a run does, and waits."""
  code = ("import pathlib, sys, time; from a2u_jax.training import workdir; "
          f"workdir.claim(pathlib.Path({str(workdir)!r}), lead=True); print('held', "
          "flush=True); time.sleep(120)")
  holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
  assert holder.stdout.readline().strip() == "held"
  return holder


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_a_second_run_on_a_workdir_in_use_is_refused_naming_the_first(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = _hold_lock(workdir)
  try:
    process = _cli("train.py", "--config", "configs/smoke.py", "--workdir", str(workdir))
    _one_clear_line(process, f"in use by another run (pid {holder.pid} on ")
    assert sorted(p.name for p in workdir.iterdir()) == [workdir_lib.LOCK_FILE]
  finally:
    holder.send_signal(signal.SIGKILL)  # a killed holder leaves nothing stuck
    holder.wait()
  workdir_lib.claim(workdir, lead=True)
  workdir_lib.release(workdir)


def test_the_lock_is_per_process_and_released(tmp_path):
  workdir_lib.claim(tmp_path, lead=True)
  workdir_lib.claim(tmp_path, lead=True)  # the same process again: no conflict
  workdir_lib.release(tmp_path)
  holder = _hold_lock(tmp_path)
  try:
    with pytest.raises(ValueError, match=f"pid {holder.pid}"):
      workdir_lib.claim(tmp_path, lead=True)
    workdir_lib.claim(tmp_path, lead=False)  # other processes of a run take no lock
  finally:
    holder.kill()
    holder.wait()


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
@pytest.mark.parametrize("results", [("metrics.jsonl",), ("model",), ("best_model", "best")])
def test_a_workdir_with_results_but_no_checkpoints_is_refused(results, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  for name in results:
    if name.endswith(".jsonl"):
      (workdir / name).write_text('{"step": 1, "loss": 0.5}\n')
    else:
      (workdir / name).mkdir()
      (workdir / name / "model.json").write_text("{}")
  before = _snapshot(workdir)
  process = _cli("train.py", "--config", "configs/smoke.py", "--workdir", str(workdir))
  _one_clear_line(process, f"holds another run's results ({', '.join(results)}) but no "
                           f"checkpoints/ to resume from")
  assert _snapshot(workdir) == before


def test_a_run_killed_before_its_first_checkpoint_may_restart(tmp_path):
  (tmp_path / "checkpoints").mkdir()  # what a run creates before its first step
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
  workdir_lib.claim(tmp_path, lead=True)
  workdir_lib.release(tmp_path)
  (tmp_path / "model").mkdir()
  (tmp_path / "model" / "model.json").write_text("{}")
  with pytest.raises(ValueError, match=r"\(model\) but no checkpoints/"):
    workdir_lib.claim(tmp_path, lead=True)


# ------------------------------------------------------------------------ resuming


def test_a_torn_last_metrics_line_is_dropped(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
  loop._truncate_metrics(path, 2)
  assert path.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n'
  assert "line 3 is not a whole record" in caplog.text


def test_an_incomplete_checkpoint_is_named(tmp_path):
  import numpy as np
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager(tmp_path / "checkpoints",
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave({"a": np.zeros(2)}),
                                          data=ocp.args.JsonSave({"step": 5})))
  manager.wait_until_finished()
  (tmp_path / "checkpoints" / "7").mkdir()  # an interrupted copy
  manager = ocp.CheckpointManager(tmp_path / "checkpoints",
                                  options=ocp.CheckpointManagerOptions(create=True))
  with pytest.raises(ValueError, match=r"checkpoints/7: an incomplete checkpoint .*remove it "
                                       r"to resume from step 5"):
    loop._restore(manager, {"a": np.zeros(2)}, None, None)


# ---------------------------------------------------------------- train.py's fields


@pytest.mark.parametrize("args,message", [
    (["--workdir="], "--workdir is empty"),
    (["--config", "configs/resampler.py", "--config.seed=1"], "--config is given 2 times"),
    (["--config=configs/resampler.py"], "--config is given 2 times"),
    (["--workdir=/tmp/a2u_never_a", "--workdir", "/tmp/a2u_never_b"],
     "--workdir is given 2 times"),
    (["--config.validation.batch_size=0"], "config.validation.batch_size must be a positive"),
    (["--config.validation.options.count=0"], "config.validation.options.count must be a "
                                              "positive integer, got 0"),
    (["--config.validation.source=folder"], "validation source 'folder' does not take count"),
    (["--config.validation.source=alphamatting"],
     "validation source 'alphamatting' does not take count"),
    (["--config.model.dropout_rate=1.5"], "config.model.dropout_rate must be in [0, 1)"),
    (["--config.seed=-1"], "config.seed must be an integer in [0, 2**32), got -1"),
    (["--config.decay_factor=0"], "config.decay_factor must be in (0, 1]"),
    (["--config.encoder_lr_divisor=-1"], "config.encoder_lr_divisor must be > 0"),
    (["--config.image_summary_every=-3"], "config.image_summary_every must be an integer"),
    (["--config.eval_every=-2"], "config.eval_every must be >= 0"),
])
@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_every_field_is_checked_at_start_up(args, message, tmp_path):
  argv = ["--config", "configs/smoke.py", *args]
  if not any(arg.startswith("--workdir") for arg in args):
    argv += ["--workdir", str(tmp_path / "run")]
  _one_clear_line(_cli("train.py", *argv), message)
  assert not (tmp_path / "run").exists() and not (ROOT / "metrics.jsonl").exists()


def test_a_config_file_that_fails_says_why_in_one_line(tmp_path):
  process = _cli("train.py", "--config", "configs/resampler.py:nosuchop", "--workdir",
                 str(tmp_path / "run"))
  _one_clear_line(process, "unknown resampler 'nosuchop'; expected one of")
  (tmp_path / "not_a_config.py").write_text("x = 1\n")
  process = _cli("train.py", "--config", str(tmp_path / "not_a_config.py"), "--workdir",
                 str(tmp_path / "run"))
  _one_clear_line(process, "has no attribute 'get_config'")
  assert not (tmp_path / "run").exists()


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_the_resnet_init_names_a_file_that_is_not_a_checkpoint(tmp_path):
  (tmp_path / "resnet34.pth").write_text("not weights\n")
  process = _cli("train.py", "--config", "configs/smoke.py", "--workdir", str(tmp_path / "run"),
                 f"--config.init.torchvision_resnet34={tmp_path / 'resnet34.pth'}")
  _one_clear_line(process, f"{tmp_path / 'resnet34.pth'}: not a readable PyTorch checkpoint")
  assert "torch" not in process.stderr.strip().splitlines()[-1].split("checkpoint", 1)[1]


@pytest.mark.slow  # trains two steps twice (~2 minutes on two cores)
def test_a_failing_validation_or_summary_does_not_cost_the_checkpoint(tmp_path, monkeypatch):
  from configs import smoke

  def fail(*args, **kwargs):
    raise RuntimeError("it broke")

  monkeypatch.setattr(loop, "validate", fail)
  config = smoke.get_config()
  config.num_train_steps, config.eval_every, config.checkpoint_every = 2, 2, 1000
  config.image_summary_every = 0
  with pytest.raises(RuntimeError, match="it broke"):
    loop.train_and_evaluate(config, tmp_path / "validation", progress=False)
  assert [p.name for p in (tmp_path / "validation" / "checkpoints").iterdir()] == ["2"]
  workdir_lib.claim(tmp_path / "validation", lead=True)  # released after the failure
  workdir_lib.release(tmp_path / "validation")
  monkeypatch.setattr(loop._Logger, "images", fail)
  config.eval_every, config.image_summary_every = 0, 2
  with pytest.raises(RuntimeError, match="it broke"):
    loop.train_and_evaluate(config, tmp_path / "summary", progress=False)
  assert [p.name for p in (tmp_path / "summary" / "checkpoints").iterdir()] == ["2"]


@pytest.mark.slow  # two training runs and a resume (~2 minutes on two cores)
def test_two_runs_on_one_workdir_and_a_killed_run_resumes(tmp_path):
  workdir = tmp_path / "run"
  command = [sys.executable, "train.py", "--config", "configs/smoke.py", "--workdir",
             str(workdir), "--config.num_train_steps=8", "--config.eval_every=0",
             "--config.checkpoint_every=2"]
  first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and not (metrics.exists() and (workdir / "checkpoints" /
                                                                   "2").exists()):
    time.sleep(0.2)
  second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  _one_clear_line(second, f"in use by another run (pid {first.pid} on ")
  first.send_signal(signal.SIGKILL)
  first.communicate()
  resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
  assert steps == list(range(1, 9))


# ------------------------------------------------------------------- multi-process


def _cluster(port: int, count: int, index: int, timeout: str = "4") -> list[str]:
  return ["train.py", "--config", "configs/smoke.py", "--coordinator_address",
          f"localhost:{port}", "--num_processes", str(count), "--process_id", str(index),
          "--distributed_timeout", timeout]


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_a_missing_peer_or_coordinator_times_out_in_one_line(tmp_path):
  from tests.test_multiprocess import _free_port

  port = _free_port()
  args = ["--workdir", str(tmp_path / "run")]
  lone = _cli(*_cluster(port, 2, 0), *args, timeout=60)
  assert "process 0 of 2: serving the coordinator at localhost:" in lone.stderr
  _one_clear_line(lone, f"waited 4 s; process 1 did not join at localhost:{port}")
  orphan = _cli(*_cluster(_free_port(), 3, 2), *args, timeout=60)
  _one_clear_line(orphan, "process 2 of 3: waited 4 s; cannot reach the coordinator at "
                          "localhost:")
  assert not (tmp_path / "run").exists()


def test_different_num_processes_are_refused_on_every_process(tmp_path):
  from tests.test_multiprocess import _free_port

  port = _free_port()
  args = ["--workdir", str(tmp_path / "run")]
  first = subprocess.Popen([sys.executable, *_cluster(port, 2, 0, "30"), *args], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  second = _cli(*_cluster(port, 3, 1, "30"), *args, timeout=60)
  _, first_err = first.communicate(timeout=60)
  first = subprocess.CompletedProcess(first.args, first.returncode, "", first_err)
  for process in (first, second):
    _one_clear_line(process, "--num_processes differs between the processes (process 0: 2, "
                             "process 1: 3)")
  assert not (tmp_path / "run").exists()


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
@pytest.mark.parametrize("address", ["localhost:abc", "localhost:0", "localhost:70000", ":80"])
def test_a_bad_coordinator_port_is_refused(address, tmp_path):
  process = _cli("train.py", "--config", "configs/smoke.py", "--workdir", str(tmp_path),
                 "--coordinator_address", address, "--num_processes", "2", "--process_id", "0")
  _one_clear_line(process, "--coordinator_address must be HOST:PORT with PORT a number")


# ------------------------------------------------------------- predict and evaluate


def _write_scene(folder: pathlib.Path, name: str = "a", ext: str = ".png", seed: int = 0):
  import numpy as np
  from PIL import Image

  from tests.test_bad_inputs import _scene

  image, trimap = _scene(seed=seed)
  (folder / "image").mkdir(parents=True, exist_ok=True)
  (folder / "trimap").mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(folder / "image" / f"{name}{ext}")
  Image.fromarray(trimap).save(folder / "trimap" / f"{name}.png")
  return np.asarray(image), trimap


def test_the_matte_of_an_rgba_alpha_file_is_its_alpha_channel(tmp_path):
  import numpy as np
  from PIL import Image

  import data_pipeline
  from data_pipeline import files

  _, trimap = _write_scene(tmp_path)
  (tmp_path / "alpha").mkdir()
  matte = np.tile(np.linspace(0, 255, trimap.shape[1]).astype(np.uint8), (trimap.shape[0], 1))
  rgba = np.dstack([np.full(trimap.shape + (3,), 255, np.uint8), matte])  # white, A = matte
  Image.fromarray(rgba).save(tmp_path / "alpha" / "a.png")
  np.testing.assert_array_equal(files.read_image(tmp_path / "alpha" / "a.png", "alpha")[0],
                                matte)
  _, _, alpha = data_pipeline.folder_items(tmp_path)[0].load()
  np.testing.assert_array_equal(alpha, matte)
  Image.fromarray(np.dstack([matte, matte])).save(tmp_path / "la.png")  # grey + alpha
  np.testing.assert_array_equal(files.read_image(tmp_path / "la.png", "alpha")[0], matte)
  Image.fromarray(matte).save(tmp_path / "grey.png")  # without an alpha channel: the grey
  np.testing.assert_array_equal(files.read_image(tmp_path / "grey.png", "alpha")[0], matte)


def _predict_cli(checkpoint, image, trimap, out, *extra):
  return _cli("-m", "a2u_jax.predict", "--checkpoint", str(checkpoint), "--image", str(image),
              "--trimap", str(trimap), "--out", str(out), *extra)


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_predict_refuses_two_images_or_trimaps_of_one_name(converted_checkpoint, tmp_path):
  _write_scene(tmp_path, "a", ".png")
  _write_scene(tmp_path, "a", ".jpg")
  process = _predict_cli(converted_checkpoint, tmp_path / "image", tmp_path / "trimap",
                         tmp_path / "out")
  _one_clear_line(process, "a.jpg and a.png share the name 'a'")
  (tmp_path / "image" / "a.jpg").unlink()
  _write_scene(tmp_path / "other", "a")
  (tmp_path / "other" / "trimap" / "a.png").rename(tmp_path / "trimap" / "a.tif")
  process = _predict_cli(converted_checkpoint, tmp_path / "image", tmp_path / "trimap",
                         tmp_path / "out")
  _one_clear_line(process, f"--trimap {tmp_path / 'trimap'}: a.png and a.tif share the name")
  assert not (tmp_path / "out").exists()


def test_predict_does_not_take_its_own_outputs_as_inputs(tmp_path):
  from a2u_jax import predict

  _write_scene(tmp_path, "a")
  for name in ("a_alpha.png", "a_preview.png"):
    (tmp_path / "image" / name).write_bytes((tmp_path / "image" / "a.png").read_bytes())
  assert predict._pairs(tmp_path / "image", tmp_path / "trimap") == [
      (tmp_path / "image" / "a.png", tmp_path / "trimap" / "a.png")]


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_predict_refuses_a_colour_trimap_even_with_round_trimap(converted_checkpoint, tmp_path):
  import numpy as np
  from PIL import Image

  image, trimap = _write_scene(tmp_path)
  colour = np.zeros(trimap.shape + (3,), np.uint8)
  colour[trimap == 255] = (255, 0, 0)  # red foreground, green unknown
  colour[trimap == 128] = (0, 255, 0)
  Image.fromarray(colour).save(tmp_path / "trimap" / "a.png")
  for extra in ((), ("--round-trimap",)):
    process = _predict_cli(converted_checkpoint, tmp_path / "image" / "a.png",
                           tmp_path / "trimap" / "a.png", tmp_path / "out", *extra)
    _one_clear_line(process, "trimap/a.png: a colour image")
  assert not any((tmp_path / "out").glob("*.png"))


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_predict_and_evaluate_name_an_out_they_cannot_write(converted_checkpoint, tmp_path):
  _write_scene(tmp_path)
  out = pathlib.Path("/sys/a2u_jax_out")  # read-only, even for root
  process = _predict_cli(converted_checkpoint, tmp_path / "image" / "a.png",
                         tmp_path / "trimap" / "a.png", out)
  _one_clear_line(process, f"--out {out}: cannot write")
  process = _cli("-m", "a2u_jax.evaluate", "--checkpoint", str(converted_checkpoint), "--data",
                 "synthetic", "--count", "1", "--out", str(out), "--no-progress")
  _one_clear_line(process, f"--out {out}: cannot write")


def test_a_full_disk_leaves_no_partial_file(converted_checkpoint, tmp_path, monkeypatch):
  import errno

  from PIL import Image

  from a2u_jax import predict

  _write_scene(tmp_path)

  def full(self, path, *args, **kwargs):
    pathlib.Path(path).write_bytes(b"half")
    raise OSError(errno.ENOSPC, "No space left on device", str(path))

  monkeypatch.setattr(Image.Image, "save", full)
  with pytest.raises(SystemExit, match=r"--out .*out: cannot write .*No space left on device"):
    predict.main(["--checkpoint", str(converted_checkpoint), "--image",
                  str(tmp_path / "image" / "a.png"), "--trimap",
                  str(tmp_path / "trimap" / "a.png"), "--out", str(tmp_path / "out")])
  assert list((tmp_path / "out").iterdir()) == []


def test_predict_refuses_an_image_too_large_before_compiling_and_max_side_predicts_it(
    converted_checkpoint, tmp_path, capsys):
  import numpy as np
  from PIL import Image

  from a2u_jax import predict

  with pytest.raises(ValueError, match=r"big.png: 6000x4000 needs about 31.\d GiB for the "
                                       r"network, more than the 8.0 GiB available; pass "
                                       r"--max-side \d+"):
    predict.check_memory(pathlib.Path("big.png"), 4000, 6000, available=8 * 2**30)
  predict.check_memory(pathlib.Path("small.png"), 1500, 2000, available=8 * 2**30)
  image, trimap = _write_scene(tmp_path)
  big_image = np.asarray(Image.fromarray(image).resize((96, 64)))
  big_trimap = np.asarray(Image.fromarray(trimap).resize((96, 64), Image.Resampling.NEAREST))
  Image.fromarray(big_image).save(tmp_path / "image" / "a.png")
  Image.fromarray(big_trimap).save(tmp_path / "trimap" / "a.png")
  predict.main(["--checkpoint", str(converted_checkpoint), "--image",
                str(tmp_path / "image" / "a.png"), "--trimap", str(tmp_path / "trimap" / "a.png"),
                "--out", str(tmp_path / "out"), "--max-side", "48"])
  assert "compiling the network for 48x32 inputs" in capsys.readouterr().err
  alpha = np.asarray(Image.open(tmp_path / "out" / "a_alpha.png"))
  assert alpha.shape == (64, 96)
  assert (alpha[big_trimap == 255] == 255).all() and (alpha[big_trimap == 0] == 0).all()
  available = predict.available_memory()
  assert available is None or available > 0


def test_predict_options_have_help_and_evaluate_says_its_units():
  from a2u_jax import evaluate

  process = _cli("-m", "a2u_jax.predict", "--help")
  for flag in ("--out OUT", "--round-trimap", "--max-side N"):
    line = next(line for line in process.stdout.splitlines() if line.strip().startswith(flag))
    assert len(line.strip()) > len(flag) + 10, line
  table = evaluate.format_table({"scored": 1, "sad": 30.5, "mse": 0.01, "grad": 1.0,
                                 "conn": 2.0})
  assert "SAD, Grad and Conn are sums over each image's unknown region in thousands" in table


# -------------------------------------------------------------------------- the API


def test_model_inputs_refuses_what_its_docstring_does_not_allow():
  import jax
  import numpy as np

  from a2u_jax import inputs

  image = np.full((1, 2, 2, 3), 0.5, np.float32)
  trimap = np.array([0, 128, 255, 0], np.uint8).reshape(1, 2, 2, 1)
  with pytest.raises(ValueError, match=r"image: expected floating-point RGB in \[0, 1\], got "
                                       r"dtype uint8 \(0..255\? divide by 255\)"):
    inputs.model_inputs((image * 255).astype(np.uint8), trimap)
  with pytest.raises(ValueError, match=r"image: expected values in \[0, 1\], found 127.5"):
    inputs.model_inputs(image * 255, trimap)
  with pytest.raises(ValueError, match=r"a \[0, 1\] trimap\? multiply by 255"):
    inputs.model_inputs(image, trimap.astype(np.float32) / 255)
  with pytest.raises(ValueError, match="trimap: expected uint8 or floating point"):
    inputs.model_inputs(image, trimap.astype(np.int32))
  # Under jit the dtypes are still checked (statically); the values cannot be.
  with pytest.raises(ValueError, match="got dtype uint8"):
    jax.jit(inputs.model_inputs)((image * 255).astype(np.uint8), trimap)
  assert jax.jit(inputs.model_inputs)(image, trimap).shape == (1, 2, 2, 4)
  assert inputs.model_inputs(image[:0], trimap[:0]).shape == (0, 2, 2, 4)


@pytest.mark.parametrize("options,message", [
    ({"norm_groups": 0}, "`norm_groups` must be a positive integer, got 0"),
    ({"rank": 2.5}, "`rank` must be a positive integer, got 2.5"),
    ({"groups": True}, "`groups` must be a positive integer, got True"),
    ({"up_kernel_size": 4}, "`up_kernel_size` must be odd"),
    ({"share": "yes"}, "`share` must be True or False"),
    ({"implementation": "fast"}, "`implementation` must be one of"),
])
def test_a2u_layer_options_are_checked_where_the_layer_is_made(options, message):
  from a2u_jax import layers

  for layer in (layers.A2UDownsample, layers.A2UKernelGenerator, layers.A2UUpsample):
    fields = layer.__dataclass_fields__
    if all(name in fields for name in options):
      with pytest.raises(ValueError, match=f"{layer.__name__}: {message}"):
        layer(**options)


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_empty_batches_give_empty_outputs_or_name_the_axis():
  import jax
  import jax.numpy as jnp

  from a2u_jax import layers, models

  down = layers.A2UDownsample(norm_groups=4)
  variables = down.init(jax.random.PRNGKey(0), jnp.zeros((0, 8, 8, 8)))  # made from none
  y, kernels = down.apply(variables, jnp.zeros((0, 8, 8, 8)))
  assert y.shape == (0, 4, 4, 8) and kernels.shape == (0, 8, 8, 9)
  assert layers.A2UUpsample().apply({}, jnp.zeros((0, 4, 4, 8)), kernels).shape == (0, 8, 8, 8)
  net = models.build_model({"resampler": "a2u", "resampler_options": {"norm_groups": 4}})
  x = jnp.zeros((0, 32, 32, 4))
  variables = jax.jit(net.init)(jax.random.PRNGKey(0), x)
  assert jax.jit(net.apply)(variables, x).shape == (0, 32, 32, 1)
  with pytest.raises(ValueError, match=r"the batch axis \(0\) of the input is empty"):
    net.apply(variables, x, train=True, mutable=["batch_stats"],
              rngs={"dropout": jax.random.PRNGKey(1)})


# -------------------------------------------------------------- model checkpoints


def _damaged(checkpoint: pathlib.Path, tmp_path: pathlib.Path, how: str) -> pathlib.Path:
  import shutil

  copy = tmp_path / how
  shutil.copytree(checkpoint, copy)
  described = json.loads((copy / "model.json").read_text())
  data = max((p for p in (copy / "variables").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  if how == "list":
    (copy / "model.json").write_text("[1, 2]")
  elif how == "unshare":
    described["resampler_options"]["share"] = False
    (copy / "model.json").write_text(json.dumps(described))
  elif how == "baseline":
    (copy / "model.json").write_text(json.dumps({"resampler": "baseline", "format_version": 2}))
  elif how == "kernel":
    described["resampler_options"]["up_kernel_size"] = 5
    (copy / "model.json").write_text(json.dumps(described))
  elif how == "truncated":
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
  elif how == "missing":
    data.unlink()
  return copy


@pytest.mark.parametrize("how,message", [
    ("list", "model.json: expected a JSON object of model options"),
    ("unshare", "model.json and variables/ describe different networks, first in module "
                "params/down0/generator/encode_u"),
    ("kernel", "describe different networks, first in module params/"),
    ("baseline", "describe different networks, first in module "),
    ("truncated", "variables: damaged or incomplete, cannot be read"),
    ("missing", "variables: damaged or incomplete, cannot be read"),
])
def test_a_damaged_or_mismatched_model_checkpoint_is_one_line(how, message,
                                                              converted_checkpoint, tmp_path):
  from a2u_jax import checkpointing

  copy = _damaged(converted_checkpoint, tmp_path, how)
  with pytest.raises(ValueError, match=message.replace("(", r"\(")) as error:
    checkpointing.load_model_checkpoint(copy)
  assert "\n" not in str(error.value) and str(copy) in str(error.value)
  if how == "missing":  # and through a CLI, which reports every loading error in one line
    _write_scene(tmp_path / "scene")
    process = _predict_cli(copy, tmp_path / "scene" / "image" / "a.png",
                           tmp_path / "scene" / "trimap" / "a.png", tmp_path / "out")
    _one_clear_line(process, message)


def test_predict_and_evaluate_read_files_upright_by_their_exif_orientation(tmp_path):
  import numpy as np
  from PIL import Image

  import data_pipeline
  from a2u_jax import predict
  from tests.test_bad_inputs import _scene

  image, trimap = _scene()  # 48 wide, 32 high as stored; orientation 6 turns it upright
  exif = Image.Exif()
  exif[0x0112] = 6
  for kind, array in (("image", image), ("trimap", trimap), ("alpha", trimap)):
    (tmp_path / kind).mkdir()
    Image.fromarray(array).save(tmp_path / kind / "a.png", exif=exif.tobytes())
  upright_image, upright_trimap, _ = predict.read_pair(
      tmp_path / "image" / "a.png", tmp_path / "trimap" / "a.png", round_trimap=False)
  np.testing.assert_array_equal(upright_image, np.rot90(image, -1))
  np.testing.assert_array_equal(upright_trimap, np.rot90(trimap, -1))
  item = data_pipeline.folder_items(tmp_path)[0]
  assert (item.height, item.width) == (48, 32)
  loaded_image, loaded_trimap, loaded_alpha = item.load()
  np.testing.assert_array_equal(loaded_image, np.rot90(image, -1))
  np.testing.assert_array_equal(loaded_alpha, np.rot90(trimap, -1))


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_tensorboard_s_tensorflow_comes_without_its_banner():
  process = _cli("-c", "from a2u_jax.quiet_tensorflow import import_tensorflow; "
                       "import sys; print('warning kept', file=sys.stderr); "
                       "assert import_tensorflow().__name__ == 'tensorflow'")
  assert process.returncode == 0, process.stderr[-2000:]
  assert "oneDNN custom operations" not in process.stderr
  assert "absl::InitializeLog()" not in process.stderr and "warning kept" in process.stderr


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_a_second_evaluation_into_an_out_in_use_is_refused(converted_checkpoint, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  holder = _hold_lock(out)
  try:
    process = _cli("-m", "a2u_jax.evaluate", "--checkpoint", str(converted_checkpoint),
                   "--data", "synthetic", "--count", "1", "--out", str(out), "--no-progress")
    _one_clear_line(process, f"--out {out}: in use by another run (pid {holder.pid} on ")
    assert sorted(p.name for p in out.iterdir()) == [workdir_lib.LOCK_FILE]
  finally:
    holder.kill()
    holder.wait()


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_a_workdir_refused_by_process_0_stops_every_process(tmp_path):
  from tests.test_multiprocess import _env, _free_port

  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = _hold_lock(workdir)
  port = _free_port()
  env = _env(1)  # one device per process: the smoke config's batch splits over two
  try:
    other = subprocess.Popen([sys.executable, *_cluster(port, 2, 1, "60"), "--workdir",
                              str(workdir)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    lead = subprocess.run([sys.executable, *_cluster(port, 2, 0, "60"), "--workdir",
                           str(workdir)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    _, other_err = other.communicate(timeout=120)
  finally:
    holder.kill()
    holder.wait()
  _one_clear_line(lead, f"in use by another run (pid {holder.pid} on ")
  _one_clear_line(subprocess.CompletedProcess([], other.returncode, "", other_err),
                  "refused by process 0 (its error says why)")


def test_evaluation_folders_refuse_two_files_of_one_name(tmp_path):
  import data_pipeline
  from data_pipeline.files import SourceError

  _write_scene(tmp_path, "a")
  (tmp_path / "alpha").mkdir()
  for ext in (".png", ".tif"):
    (tmp_path / "alpha" / f"a{ext}").write_bytes((tmp_path / "trimap" / "a.png").read_bytes())
  with pytest.raises(SourceError, match=r"alpha: a.png and a.tif share the name 'a'"):
    data_pipeline.folder_items(tmp_path)


@pytest.mark.parametrize("module,args", [
    ("a2u_jax.predict", ["--checkpoint", "x", "--image", "a.png", "--trimap", "b.png"]),
    ("a2u_jax.evaluate", ["--checkpoint", "x", "--data", "synthetic"]),
])
@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_an_empty_out_is_refused_not_the_current_folder(module, args):
  process = _cli("-m", module, *args, "--out=")
  assert process.returncode == 2 and "Traceback" not in process.stderr
  assert "error: argument --out: is empty" in process.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # trains two steps (~1 minute on two cores)
def test_a_validation_sad_that_is_not_finite_chooses_no_best_model(tmp_path, monkeypatch):
  from configs import smoke

  monkeypatch.setattr(loop, "validate", lambda *args, **kwargs: {"sad": float("nan"),
                                                                 "mse": float("nan")})
  config = smoke.get_config()
  config.num_train_steps, config.eval_every = 2, 1
  loop.train_and_evaluate(config, tmp_path, progress=False)
  assert not (tmp_path / "best_model").exists()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


def test_a_coordinator_port_in_use_is_one_line(tmp_path):
  import socket

  with socket.socket() as taken:
    taken.bind(("localhost", 0))
    taken.listen()
    port = taken.getsockname()[1]
    process = _cli(*_cluster(port, 2, 0), "--workdir", str(tmp_path / "run"), timeout=60)
  _one_clear_line(process, f"cannot serve the coordinator at localhost:{port}: port {port} is "
                           f"in use by another program or run")


def test_cluster_detection_without_a_cluster_says_what_to_do(tmp_path):
  process = _cli("train.py", "--config", "configs/smoke.py", "--workdir", str(tmp_path / "run"),
                 "--config.distributed=True")
  _one_clear_line(process, "--config.distributed / --distributed: JAX found no cluster to "
                           "join")
  assert not (tmp_path / "run").exists()


def test_a_workdir_given_as_the_checkpoint_names_its_model_folders(converted_checkpoint, tmp_path):
  import shutil

  from a2u_jax import checkpointing

  shutil.copytree(converted_checkpoint, tmp_path / "model")
  with pytest.raises(FileNotFoundError, match=r"is not a model checkpoint: .*\(a train.py "
                                              r"workdir: give .*/model\)"):
    checkpointing.load_model_checkpoint(tmp_path)


# ------------------------------------------------- resuming with another config (issue 33)


def _smoke_config(**changes):
  from configs import smoke

  config = smoke.get_config()
  for name, value in changes.items():
    node = config
    *groups, field = name.split(".")
    for group in groups:
      node = node[group]
    node[field] = value
  return config


def _resumable_workdir(folder: pathlib.Path) -> pathlib.Path:
  """A workdir as a run of the smoke config leaves it: its config.json and a checkpoint."""
  folder.mkdir(exist_ok=True)
  workdir_lib.claim(folder, lead=True, config=_smoke_config())
  workdir_lib.release(folder)
  (folder / "checkpoints" / "5").mkdir(parents=True)
  return folder


def test_resuming_with_another_crop_size_is_refused_and_config_json_kept(tmp_path):
  workdir = _resumable_workdir(tmp_path / "run")
  before = _snapshot(workdir)
  process = _cli("train.py", "--config", "configs/smoke.py", "--workdir", str(workdir),
                 "--config.crop_size=32")
  _one_clear_line(process, f"--workdir {workdir}: resuming with a config that changes what "
                           f"its steps compute (config.crop_size: 64 there, 32 here, as "
                           f"config.json records the run)")
  assert "Rerun with the recorded values, or use another --workdir" in process.stderr
  assert _snapshot(workdir) == before


@pytest.mark.parametrize("name,value", [
    ("batch_size", 8), ("seed", 1), ("learning_rate", 0.5), ("dtype", "bfloat16"),
    ("steps_per_epoch", 3), ("decay_epochs", (1,)), ("data.options.num_foregrounds", 2),
    ("model.resampler_options.share", False), ("model.dropout_rate", 0.0),
    ("validation.sad_rule", "matlab"), ("init.torchvision_resnet34", "/w.pth"),
])
def test_a_resume_refuses_every_field_that_changes_what_its_steps_computed(name, value,
                                                                             tmp_path):
  workdir = _resumable_workdir(tmp_path)
  recorded = (workdir / workdir_lib.CONFIG_FILE).read_bytes()
  with pytest.raises(ValueError, match=rf"\(config\.{re.escape(name)}: .* there, .* here, as "
                                       rf"config.json records the run\)"):
    workdir_lib.claim(workdir, lead=True, config=_smoke_config(**{name: value}))
  assert (workdir / workdir_lib.CONFIG_FILE).read_bytes() == recorded
  workdir_lib.claim(workdir, lead=True)  # the refusal took no lock
  workdir_lib.release(workdir)


def test_a_resume_may_change_how_far_it_goes_and_what_it_logs(tmp_path):
  workdir = _resumable_workdir(tmp_path)
  changed = {"num_train_steps": 40, "num_epochs": 3, "log_every": 7, "checkpoint_every": 9,
             "keep_checkpoints": 1, "eval_every": 0, "image_summary_every": 0,
             "validation.batch_size": 4, "compilation_cache_dir": "/cache", "distributed": True}
  assert set(changed) == workdir_lib.RESUMABLE_FIELDS
  workdir_lib.claim(workdir, lead=True, config=_smoke_config(**changed))
  workdir_lib.release(workdir)
  recorded = json.loads((workdir / workdir_lib.CONFIG_FILE).read_text())
  assert recorded["num_train_steps"] == 40 and recorded["validation"]["batch_size"] == 4
  # A run without a checkpoint starts over: its config.json is replaced.
  (workdir / "checkpoints" / "5").rmdir()
  workdir_lib.claim(workdir, lead=True, config=_smoke_config(crop_size=32))
  workdir_lib.release(workdir)
  assert json.loads((workdir / workdir_lib.CONFIG_FILE).read_text())["crop_size"] == 32
  assert not list(workdir.glob(".config.json.*"))  # written whole, through a staging file


def test_a_torn_config_json_is_named_not_overwritten(tmp_path):
  workdir = _resumable_workdir(tmp_path)
  (workdir / workdir_lib.CONFIG_FILE).write_text('{"batch_size": 4, "crop')
  with pytest.raises(ValueError, match=r"config.json: not valid JSON, so what this run's "
                                       r"checkpoints were trained with is unknown"):
    workdir_lib.claim(workdir, lead=True, config=_smoke_config())
  assert (workdir / workdir_lib.CONFIG_FILE).read_text() == '{"batch_size": 4, "crop'


# ------------------------------------------- storage faults during training (issue 33)


@pytest.fixture
def small_disk(tmp_path):
  """A factory of tmpfs folders of a given size (a real disk to fill up), unmounted after
  the test; skips where this process cannot mount (mounting needs root)."""
  mounted = []

  def mount(size: str) -> pathlib.Path:
    folder = tmp_path / f"disk{len(mounted)}"
    folder.mkdir()
    if os.geteuid() != 0:
      pytest.skip("a full disk is simulated with a small tmpfs, and mounting one needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                             str(folder)], capture_output=True, text=True, check=False)
    if result.returncode:
      pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); a full disk is "
                  f"simulated with one")
    mounted.append(folder)
    return folder

  yield mount
  for folder in mounted:
    subprocess.run(["umount", "--lazy", str(folder)], check=False)


def _fill(folder: pathlib.Path, leave: int) -> pathlib.Path:
  """Fills `folder`'s file system until `leave` bytes are free; returns the filler."""
  stat = os.statvfs(folder)
  filler = folder / "filler"
  with filler.open("wb") as f:
    remaining = stat.f_bavail * stat.f_frsize - leave
    while remaining > 0:
      remaining -= f.write(bytes(min(remaining, 1 << 24)))
  return filler


def test_a_storage_fault_behind_orbax_or_os_errors_is_recognised():
  import errno

  from a2u_jax import checkpointing

  orbax_says = ValueError('RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database: '
                          'Failed to write 68288512 bytes to file 6: No space left on device '
                          "[os_error_code='28']")
  assert checkpointing.storage_fault(orbax_says) == errno.ENOSPC
  try:
    try:
      raise PermissionError(errno.EACCES, "Permission denied", "/w/checkpoints/2.tmp")
    except PermissionError as cause:
      raise RuntimeError("save failed") from cause
  except RuntimeError as chained:
    assert checkpointing.storage_fault(chained) == errno.EACCES
  assert checkpointing.storage_fault(OSError(errno.EROFS, "Read-only file system")) == errno.EROFS
  assert checkpointing.storage_fault(ValueError("Disk quota exceeded")) == errno.EDQUOT
  assert checkpointing.storage_fault(FileNotFoundError(errno.ENOENT, "gone")) is None
  assert checkpointing.storage_fault(ValueError("shapes do not match")) is None


def test_a_full_disk_under_a_training_checkpoint_is_one_line_and_keeps_the_last(small_disk,
                                                                                capfd):
  import numpy as np
  import orbax.checkpoint as ocp

  from a2u_jax import checkpointing

  folder = small_disk("2m") / "checkpoints"
  manager = ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(create=True))

  def save(step, size):  # random values: orbax compresses its files
    weights = np.random.default_rng(step).random(size, np.float32)
    checkpointing.save_training_checkpoint(manager, step, ocp.args.Composite(
        state=ocp.args.StandardSave({"w": weights}), data=ocp.args.JsonSave({"step": step})))
    return weights

  first = save(1, 1000)
  with pytest.raises(checkpointing.StorageError) as raised:
    save(2, 4_000_000)  # 16 MB
  assert str(raised.value) == (
      f"{folder}: cannot write the checkpoint of step 2: no space left on the device; free "
      f"space there, then {checkpointing.RESUME}")
  err = capfd.readouterr().err
  assert "Traceback" not in err and "No space left" not in err, err[-2000:]
  assert sorted(p.name for p in folder.iterdir()) == ["1"]  # the partial step 2 removed
  restored = ocp.CheckpointManager(folder).restore(1, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
  np.testing.assert_array_equal(restored["state"]["w"], first)


def test_a_full_disk_under_a_model_checkpoint_is_one_line_and_leaves_nothing(small_disk,
                                                                             capfd):
  import numpy as np

  from a2u_jax import checkpointing

  disk = small_disk("2m")
  with pytest.raises(checkpointing.StorageError, match=rf"^{disk / 'model'}: cannot write the "
                                                       rf"model checkpoint: no space left on "
                                                       rf"the device; free space there, then "
                                                       rf"write it again$"):
    checkpointing.save_model_checkpoint(disk / "model",
                                        {"params": {"w": np.random.default_rng(0).random(
                                            4_000_000, np.float32)}},
                                        {"resampler": "a2u"})
  assert "Traceback" not in capfd.readouterr().err
  assert list(disk.iterdir()) == []  # no staging folder, no half-written model/


def _training(workdir: pathlib.Path, *extra: str, prefix=()) -> list[str]:
  return [*prefix, sys.executable, "train.py", "--config", "configs/smoke.py", "--workdir",
          str(workdir), "--config.crop_size=32", "--config.num_train_steps=3",
          "--config.checkpoint_every=1", "--config.eval_every=0",
          "--config.image_summary_every=0", *extra]


def _stopped_after_checkpoint_1(command: list[str]) -> subprocess.Popen:
  """train.py started with `command`, stopped (SIGSTOP) once its checkpoint of step 1 is
  complete: before the checkpoint of step 2."""
  workdir = pathlib.Path(command[command.index("--workdir") + 1])
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  complete = workdir / "checkpoints" / "1" / "_CHECKPOINT_METADATA"
  deadline = time.monotonic() + 600
  while not complete.exists() and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGSTOP)
  assert complete.exists(), process.communicate()[1][-2000:]
  return process


def _finished(process: subprocess.Popen) -> subprocess.CompletedProcess:
  process.send_signal(signal.SIGCONT)
  out, err = process.communicate(timeout=300)
  return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.slow  # trains two steps, then one on resuming (~2-4 minutes on two cores)
def test_a_disk_filling_up_stops_training_at_the_failed_save_in_one_line(small_disk):
  workdir = small_disk("400m") / "run"
  process = _stopped_after_checkpoint_1(_training(workdir))
  # A little room: the step's metrics still fit, its checkpoint (~100 MB) does not.
  filler = _fill(workdir.parent, leave=1 << 20)
  failed = _finished(process)
  _one_clear_line(failed, f"error: {workdir / 'checkpoints'}: cannot write the checkpoint of "
                          f"step 2: no space left on the device; free space there, then rerun "
                          f"the same command: it resumes from the last complete checkpoint")
  assert "No space left" not in failed.stderr  # orbax's own errors are not printed
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2]  # it stopped at the failed save, not steps later
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]
  filler.unlink()
  resumed = subprocess.run(_training(workdir), cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming from step 1" in resumed.stderr
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3] and (workdir / "model" / "model.json").exists()


@pytest.mark.slow  # trains two steps, then one on resuming (~2-4 minutes on two cores)
def test_a_workdir_made_read_only_stops_training_at_the_failed_save_in_one_line(tmp_path):
  import shutil

  prefix = ()
  if os.geteuid() == 0:  # root writes through any mode: run without that capability
    if shutil.which("setpriv") is None:
      pytest.skip("as root, a read-only workdir needs setpriv (util-linux) to drop "
                  "CAP_DAC_OVERRIDE")
    prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--")
  workdir = tmp_path / "run"
  # No metrics before the last step: the checkpoint of step 2 is the next write.
  command = _training(workdir, "--config.log_every=100", prefix=prefix)
  process = _stopped_after_checkpoint_1(command)
  subprocess.run(["chmod", "-R", "a-w", str(workdir)], check=True)
  try:
    failed = _finished(process)
  finally:
    subprocess.run(["chmod", "-R", "u+w", str(workdir)], check=True)
  _one_clear_line(failed, f"error: {workdir / 'checkpoints'}: cannot write the checkpoint of "
                          f"step 2: permission denied; give this user write permission there, "
                          f"then rerun the same command")
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]
  resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming from step 1" in resumed.stderr
  assert (workdir / "model" / "model.json").exists()
