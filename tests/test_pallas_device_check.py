"""`benchmarks/device_check.py --sections kernels`, the GPU check of the reassembly's
Pallas kernels, run at toy size on the CPU (kernels in interpret mode).

Its own file: the section runs tests/test_pallas_reassembly.py (and the Pallas cases of
two other files) in a child pytest, which must not collect this test.
"""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_check  # noqa: E402  (benchmarks/device_check.py)


@pytest.mark.slow  # kernel tests, interpret-mode timings, three training steps: ~5 min
def test_kernels_section_tests_times_and_steps_at_toy_size(tmp_path):
  out = tmp_path / "kernels.json"
  subprocess.run([sys.executable, "benchmarks/device_check.py", "--quick", "--sections",
                  "kernels", "--no-torch", "--budget-s", "1200", "--out", str(out)],
                 cwd=ROOT, check=True, timeout=1800)
  report = json.loads(out.read_text())
  kernels = report["kernels"]
  assert kernels["tests"]["passed"], kernels["tests"]
  assert "passed" in kernels["tests"]["summary"]
  assert [r["case"] for r in kernels["reassembly"]] == [
      c.name for c in device_check.QUICK.reassembly_cases]
  for row in kernels["reassembly"]:
    for key in ("xla_forward_ms", "xla_forward_backward_ms", "pallas_forward_ms",
                "pallas_forward_backward_ms"):
      assert row[key] > 0, (key, row)
  assert set(kernels["steps"]) == {"A2U share, XLA reassembly",
                                   "A2U share, Pallas reassembly", "baseline"}
  for name, step in kernels["steps"].items():
    assert step["step_ms"] > 0, (name, step)
  # Both A2U steps train the same network from the same state: the same loss.
  xla, pallas = (kernels["steps"][f"A2U share, {k} reassembly"] for k in ("XLA", "Pallas"))
  assert abs(xla["loss"] - pallas["loss"]) <= 1e-4 * abs(xla["loss"])
  assert set(kernels["ratios"]) == {"A2U share, XLA reassembly / baseline step",
                                    "A2U share, Pallas reassembly / baseline step"}
  assert "## Pallas kernels of the reassembly" in report["markdown"]
  assert "XLA / Pallas fwd+bwd" in report["markdown"]
