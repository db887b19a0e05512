"""The benchmark scripts run (tiny settings) and print their tables."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from a2u_jax import metrics
from tests.conftest import SHARED

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
  result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _device_check_section(section: str, tmp_path: pathlib.Path) -> tuple[str, dict]:
  """(printed tables, JSON report of `section`) of device_check.py --quick --sections."""
  out_file = tmp_path / "device_check.json"
  out = _run("benchmarks/device_check.py", "--quick", "--sections", section, "--out",
             str(out_file))
  return out, json.loads(out_file.read_text())[section]


@pytest.mark.slow  # a subprocess timing eight implementations (benchmarks run in CI)
def test_reassembly_benchmark_prints_its_table():
  out = _run("benchmarks/reassembly.py", "--quick", "--repeats", "1")
  assert "| a2u_jax slices (default) |" in out and "| a2u_jax gather |" in out
  assert "floor: JAX nearest 2x" in out and "floor: JAX 2x2 avg pool" in out
  assert "PyTorch" in out


@pytest.mark.slow  # three network compilations (~30 s on two cores)
def test_network_benchmark_checks_the_pytorch_transcription_and_prints_its_table():
  out = _run("benchmarks/network.py", "--sizes", "32", "--no-batch8", "--repeats", "1")
  for row in ("a2u_jax A2U float32", "a2u_jax A2U bfloat16", "a2u_jax baseline float32",
              "PyTorch"):
    assert f"| {row}" in out
  assert "A2U / baseline (float32):" in out


@pytest.mark.slow  # a subprocess running both data pipelines (benchmarks run in CI)
def test_data_pipeline_benchmark_prints_its_table():
  out = _run("benchmarks/input_pipeline.py", "--samples", "4", "--batch", "2", "--crop", "64",
             "--min-size", "100", "--max-size", "140", "--step-seconds", "0.5")
  assert "| synthetic, in memory |" in out and "needs 4.0 samples/s" in out
  assert "JAX / tf.data" in out and "x |" in out


@pytest.mark.slow  # compiles two training steps and two inferences (~1 min on two cores)
def test_train_step_benchmark_prints_its_table():
  out = _run("benchmarks/train_step.py", "--cases", "32x2", "--repeats", "1")
  rows = {line.split("|")[2].strip(): [cell.strip() for cell in line.split("|")[3:-1]]
          for line in out.splitlines() if line.startswith("| 32x32, batch 2 |")}
  for name in ("a2u_jax A2U (float32, jit)", "a2u_jax baseline (float32, jit)"):
    step, images, train_compile, inference_compile, _ = rows[name]
    assert float(step) > 0 and float(train_compile) > 0 and float(inference_compile) > 0
  ratio = rows["A2U step / baseline step (target <= 1.5)"][0]
  assert float(ratio.rstrip("x")) == pytest.approx(
      float(rows["a2u_jax A2U (float32, jit)"][0])
      / float(rows["a2u_jax baseline (float32, jit)"][0]), rel=0.02)
  assert any(name.startswith("PyTorch") for name in rows)


@pytest.mark.slow  # two training-step compilations (~2 min on two cores)
def test_device_check_quick_prints_its_tables_and_writes_json(tmp_path):
  import json

  out = _run("benchmarks/device_check.py", "--quick", "--sections", "reassembly", "train",
             "inference", "--train-dtypes", "float32", "--out", str(tmp_path / "check.json"))
  for heading in ("## Reassembly", "## Training step (32x32 crops, batch 2", "## Inference"):
    assert heading in out
  report = json.loads((tmp_path / "check.json").read_text())
  assert report["plan"] == "quick" and report["markdown"] in out
  assert [r["case"] for r in report["reassembly"]] == [
      "up small 64ch 32->64 K3", "down small 64ch 64->32 K6"]
  rows = {r["row"]: r for r in report["train"]["rows"]}
  assert "a2u_jax unshare" not in rows  # the full plan only
  for variant in ("share", "baseline"):
    row = rows[f"a2u_jax {variant}"]
    assert row["step_ms"] > 0 and row["compile_s"] > 0 and np.isfinite(row["loss"])
    assert row["tflop_per_step"] > 0
  assert report["train"]["ratios"]["a2u_over_baseline_step"] == pytest.approx(
      rows["a2u_jax share"]["step_ms"] / rows["a2u_jax baseline"]["step_ms"])
  assert {(r["model"], r["dtype"]) for r in report["inference"]} == {
      (m, d) for m in ("A2U", "baseline") for d in ("float32", "bfloat16")}
  assert all(r["ms"] > 0 for r in report["inference"])


def test_device_check_peak_table_and_arguments():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import device_check

  assert device_check.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
  assert device_check.peak_tflops("NVIDIA H100 80GB HBM3", "float32") == 494.7
  assert device_check.peak_tflops("NVIDIA H200", "bfloat16") == 989.4
  assert device_check.peak_tflops("cpu", "float32") is None
  result = subprocess.run([sys.executable, "benchmarks/device_check.py", "--budget-s", "0"],
                          cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 2 and "--budget-s must be > 0" in result.stderr
  # The one device command covers the accelerator checks in the order they matter: the
  # training steps (float32 and bfloat16), the Pallas kernels, the input pipeline, train.py.
  assert device_check.DEFAULT_SECTIONS == ("train", "kernels", "pipeline", "trainpy")
  assert device_check.FULL.train_crop == 512 and device_check.FULL.train_batch == 16
  assert device_check.FULL.train_variants == ("share", "baseline")


@pytest.mark.slow  # train.py twice at toy size, one killed and resumed (~2 min)
def test_device_check_trainpy_section_resumes_to_the_same_losses(tmp_path):
  out, report = _device_check_section("trainpy", tmp_path)
  assert "## train.py on the JAX pipeline: SIGKILL and resume" in out
  assert report["steps"] == 6 and report["killed_after_step"] < 6
  assert report["resumed_losses_equal"] and report["best_model"]


@pytest.mark.slow  # PyMatting's Numba kernels compile on first use (~50 s in a fresh venv)
def test_classical_baseline_scores_what_it_writes(tmp_path):
  photos = SHARED / "data" / "alphamatting_lowres"
  if not photos.is_dir():
    pytest.skip(f"needs {photos} (shared real photographs)")
  pytest.importorskip("pymatting")
  out = _run("benchmarks/classical_baseline.py", "--data-dir", str(photos), "--limit", "1",
             "--methods", "cf", "--out", str(tmp_path))
  row = next(line for line in out.splitlines() if line.startswith("closed-form"))
  sad = float(row.split()[-5])
  alpha = np.asarray(Image.open(tmp_path / "cf" / "image_01.png"))
  gt = np.asarray(Image.open(photos / "alpha_01.png").convert("L"))
  trimap = np.asarray(Image.open(photos / "trimap_01.png").convert("L"))
  assert sad == pytest.approx(metrics.sad(alpha, gt, trimap), abs=0.005)
  assert 0 < sad < 10  # closed-form matting gets close on this photo (about 2.7)


def _write_idx(path, images):
  import gzip
  header = b"".join(v.to_bytes(4, "big") for v in (2051, *images.shape))
  path.write_bytes(gzip.compress(header + images.astype(np.uint8).tobytes()))


@pytest.mark.slow  # trains two operators in a subprocess (~15 s); the protocol's parts are
# covered by tests/test_reconstruction_protocol.py in the default run
def test_reconstruction_benchmark_table_figure_and_fashion_mnist_reader(tmp_path):
  out = _run("benchmarks/reconstruction.py", "--operators", "nearest", "max_unpool",
             "--steps", "3", "--train-images", "16", "--out", str(tmp_path / "synthetic"))
  assert ("| operator | parameters | PSNR (dB) | SSIM | MAE | MSE | step (ms) | kernel | "
          "largest tap L1, start → end | largest tap L2, start → end | uniform |") in out
  rows = [line for line in out.splitlines() if line.startswith(("| nearest", "| max_unpool"))]
  assert len(rows) == 2 and all(float(row.split("|")[3]) > 0 for row in rows)
  with Image.open(tmp_path / "synthetic" / "reconstruction.png") as figure:
    assert figure.size == (6 * 34 * 3, 3 * 34 * 3)  # 6 images; truth + 2 operators
  # Fashion-MNIST from IDX files (here two tiny fake ones), resized 28 -> 32.
  rng = np.random.default_rng(0)
  folder = tmp_path / "fmnist"
  folder.mkdir()
  _write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)))
  _write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (7, 28, 28)))
  out = _run("benchmarks/reconstruction.py", "--operators", "nearest", "--steps", "2",
             "--fashion-mnist", str(folder), "--out", str(tmp_path / "fmnist_out"))
  assert "Fashion-MNIST (20 train / 7 test, 32x32)" in out
  (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
  result = subprocess.run([sys.executable, "benchmarks/reconstruction.py", "--fashion-mnist",
                           str(folder)], cwd=ROOT, capture_output=True, text=True, check=False)
  assert result.returncode != 0 and "not an IDX image file" in result.stderr


@pytest.mark.slow  # the JAX pipeline's accelerator check at toy size: ~4 min on two cores
def test_pipeline_check_trains_resumes_and_validates(tmp_path):
  out_file = tmp_path / "pipeline_check.json"
  out = _run("benchmarks/pipeline_check.py", "--quick", "--out", str(out_file))
  assert "1. device-side augmentation" in out and "2. the whole pipeline" in out
  report = json.loads(out_file.read_text())
  assert report["pipeline"]["compiles_while_timed"] == 0
  train = report["train"]
  assert train["steps"] == 6 and train["killed_after_step"] < 6
  assert train["resumed_losses_equal"] and train["best_model"]


@pytest.mark.slow  # the device check's pipeline section at toy size (~1 min)
def test_device_check_pipeline_section(tmp_path):
  out, report = _device_check_section("pipeline", tmp_path)
  assert "## JAX input pipeline" in out
  assert report["augment"]["augment_ms"] > 0 and report["pipeline"]["samples_per_s"] > 0
