"""evaluate.py and predict.py end to end, with a converted random checkpoint on small copies
of the shared real photographs."""

import csv

import jax
import numpy as np
import pytest
from PIL import Image

import data_pipeline
from a2u_jax import checkpointing, evaluate, metrics, predict
from tests.conftest import SHARED

PHOTOS = SHARED / "data" / "alphamatting_lowres"
# (photo number, size): two padded shapes, 48x64 and 64x48, so two shape buckets.
SMALL = {"01": (64, 40), "03": (40, 64), "05": (62, 37)}


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
  """image/, trimap/, alpha/ with three shared photos shrunk to a few dozen pixels."""
  if not PHOTOS.is_dir():
    pytest.skip(f"needs {PHOTOS} (shared real photographs, not shipped with the package)")
  root = tmp_path_factory.mktemp("photos")
  for kind, prefix, mode, resample in (("image", "image", "RGB", Image.BILINEAR),
                                       ("trimap", "trimap", "L", Image.NEAREST),
                                       ("alpha", "alpha", "L", Image.BILINEAR)):
    (root / kind).mkdir()
    for number, size in SMALL.items():
      with Image.open(PHOTOS / f"{prefix}_{number}.png") as im:
        im.convert(mode).resize(size, resample).save(root / kind / f"photo{number}.png")
  return root


@pytest.fixture(scope="module")
def model_and_variables(converted_checkpoint):
  return checkpointing.load_model_checkpoint(converted_checkpoint)


def _rows(out):
  with (out / evaluate.METRICS_CSV).open() as f:
    return {row["name"]: row for row in csv.DictReader(f)}


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_evaluate_writes_alphas_and_metrics_with_one_compilation_per_bucket(
    photo_folder, model_and_variables, tmp_path):
  model, variables = model_and_variables
  items = data_pipeline.folder_items(photo_folder)
  assert data_pipeline.num_buckets(items) == 2
  predict._sharded_forward.cache_clear()  # count this test's compilations from zero
  two = evaluate.evaluate(model, variables, items, tmp_path / "two",
                          devices=jax.local_devices()[:2], progress=False)
  assert two["compilations"] == 2
  rows = _rows(tmp_path / "two")
  assert list(next(iter(rows.values()))) == list(evaluate.CSV_COLUMNS)
  assert sorted(rows) == ["photo01", "photo03", "photo05"]
  for name, row in rows.items():
    with Image.open(tmp_path / "two" / "alpha" / f"{name}.png") as im:
      alpha = np.asarray(im)
    width, height = SMALL[name[-2:]]
    assert alpha.shape == (height, width) and alpha.dtype == np.uint8
    gt = np.asarray(Image.open(photo_folder / "alpha" / f"{name}.png"))
    trimap = np.asarray(Image.open(photo_folder / "trimap" / f"{name}.png"))
    # The authors' post-processing: the trimap's known regions are restored exactly.
    np.testing.assert_array_equal(alpha[trimap == 0], 0)
    np.testing.assert_array_equal(alpha[trimap == 255], 255)
    for key, value in metrics.all_metrics(alpha, gt, trimap).items():
      assert float(row[key]) == value
  assert two["sad"] == pytest.approx(np.mean([float(r["sad"]) for r in rows.values()]))

  # One device, a batch of two per step: every image is still scored once, same numbers.
  one = evaluate.evaluate(model, variables, items, tmp_path / "one",
                          devices=jax.local_devices()[:1], batch_per_device=2, progress=False)
  assert one["compilations"] == 2
  one_rows = _rows(tmp_path / "one")
  assert sorted(one_rows) == sorted(rows)
  for name in rows:
    for key in metrics.METRICS:
      assert float(one_rows[name][key]) == pytest.approx(float(rows[name][key]), rel=1e-3,
                                                         abs=1e-6)


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_resume_scores_only_what_is_missing(photo_folder, model_and_variables, tmp_path):
  model, variables = model_and_variables
  items = data_pipeline.folder_items(photo_folder)
  out = tmp_path / "run"
  predictor = predict.Predictor(model, variables, jax.local_devices()[:1])
  evaluate.evaluate(model, variables, items, out, progress=False, predictor=predictor,
                    run_info={"data": "photos"})
  before = _rows(out)
  with pytest.raises(ValueError, match="already holds results; pass --resume"):
    evaluate.evaluate(model, variables, items, out, progress=False, predictor=predictor,
                      run_info={"data": "photos"})
  with pytest.raises(ValueError, match="results there are for"):
    evaluate.evaluate(model, variables, items, out, resume=True, progress=False,
                      predictor=predictor, run_info={"data": "other"})

  # A killed run: one PNG missing (photo03, the second bucket), and the CSV's last row
  # (photo05) torn.
  assert list(before) == ["photo01", "photo03", "photo05"]  # the items' order
  (out / "alpha" / "photo03.png").unlink()
  text = (out / evaluate.METRICS_CSV).read_text()
  (out / evaluate.METRICS_CSV).write_text(text[:-20])
  untouched = (out / "alpha" / "photo01.png").stat().st_mtime_ns
  summary = evaluate.evaluate(model, variables, items, out, resume=True, progress=False,
                              predictor=predictor, run_info={"data": "photos"})
  assert summary["images"] == 3 and summary["compilations"] == 0
  assert (out / "alpha" / "photo01.png").stat().st_mtime_ns == untouched
  after = _rows(out)
  assert sorted(after) == sorted(before)
  for name in before:
    assert after[name] == before[name]


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_evaluate_cli_on_the_shared_photographs(converted_checkpoint, photo_folder, tmp_path,
                                                capsys):
  out = tmp_path / "cli"
  evaluate.main(["--checkpoint", str(converted_checkpoint), "--data", "folder",
                 "--data-dir", str(photo_folder), "--out", str(out), "--devices", "2",
                 "--no-progress"])
  printed = capsys.readouterr().out
  assert printed.splitlines()[0].split() == ["images", "SAD", "MSE", "Grad", "Conn"]
  assert printed.splitlines()[1].split()[0] == "3"
  assert " compilations" in printed
  assert sorted(p.name for p in (out / "alpha").iterdir()) == [
      "photo01.png", "photo03.png", "photo05.png"]


@pytest.mark.parametrize("argv,message", [
    (["--data", "folder"], "--data folder needs --data-dir"),
    (["--data", "folder", "--data-dir", "/nonexistent/x"], "/nonexistent/x"),
    (["--data", "synthetic", "--devices", "9"], "--devices must be in 1..4"),
])
def test_evaluate_cli_errors(argv, message, converted_checkpoint, tmp_path, capsys):
  with pytest.raises(SystemExit) as error:
    evaluate.main(["--checkpoint", str(converted_checkpoint), "--out", str(tmp_path / "o"),
                   *argv])
  assert message in str(error.value)


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_predict_cli_matches_evaluate_and_writes_previews(converted_checkpoint, photo_folder,
                                                          tmp_path):
  out = tmp_path / "pred"
  predict.main(["--checkpoint", str(converted_checkpoint), "--image",
                str(photo_folder / "image"), "--trimap", str(photo_folder / "trimap"),
                "--out", str(out)])
  evaluated = tmp_path / "eval"
  evaluate.main(["--checkpoint", str(converted_checkpoint), "--data", "folder",
                 "--data-dir", str(photo_folder), "--out", str(evaluated), "--devices", "1",
                 "--no-progress"])
  for number, (width, height) in SMALL.items():
    alpha = np.asarray(Image.open(out / f"photo{number}_alpha.png"))
    np.testing.assert_array_equal(
        alpha, np.asarray(Image.open(evaluated / "alpha" / f"photo{number}.png")))
    with Image.open(out / f"photo{number}_preview.png") as preview:
      assert preview.size == (4 * width, height) and preview.mode == "RGB"

  # One pair, written next to the inputs under a name that is not an input.
  single = tmp_path / "single"
  single.mkdir()
  for kind in ("image", "trimap"):
    (single / f"{kind}.png").write_bytes((photo_folder / kind / "photo01.png").read_bytes())
  predict.main(["--checkpoint", str(converted_checkpoint), "--image", str(single / "image.png"),
                "--trimap", str(single / "trimap.png"), "--out", str(single)])
  assert sorted(p.name for p in single.iterdir()) == [
      "image.png", "image_alpha.png", "image_preview.png", "trimap.png"]


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_predict_cli_refuses_bad_inputs(converted_checkpoint, photo_folder, tmp_path):
  image = photo_folder / "image" / "photo01.png"
  trimap = np.asarray(Image.open(photo_folder / "trimap" / "photo01.png"))

  def run(image_path, trimap_path, *extra, out=tmp_path / "out"):
    with pytest.raises(SystemExit) as error:
      predict.main(["--checkpoint", str(converted_checkpoint), "--image", str(image_path),
                    "--trimap", str(trimap_path), "--out", str(out), *extra])
    return str(error.value)

  wrong_size = tmp_path / "wrong_size.png"
  Image.fromarray(trimap[:-1]).save(wrong_size)
  assert "is 64x40 but its trimap" in run(image, wrong_size)

  soft = tmp_path / "soft.png"
  Image.fromarray(np.where(trimap == 128, 100, trimap).astype(np.uint8)).save(soft)
  assert "trimap values must be 0, 128 or 255, found [100]" in run(image, soft)
  predict.main(["--checkpoint", str(converted_checkpoint), "--image", str(image), "--trimap",
                str(soft), "--out", str(tmp_path / "rounded"), "--round-trimap"])
  assert (tmp_path / "rounded" / "photo01_alpha.png").exists()

  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png")
  assert f"{broken}: cannot be read as an image" in run(image, broken)
  assert "file not found" in run(tmp_path / "missing.png", soft)

  # The trimap is named like the alpha output and lies in --out: it must not be replaced.
  clash = tmp_path / "clash"
  clash.mkdir()
  (clash / "photo01_alpha.png").write_bytes((photo_folder / "trimap" / "photo01.png").read_bytes())
  before = (clash / "photo01_alpha.png").read_bytes()
  assert "refusing to overwrite the input file" in run(image, clash / "photo01_alpha.png",
                                                       out=clash)
  assert (clash / "photo01_alpha.png").read_bytes() == before
  assert sorted(p.name for p in clash.iterdir()) == ["photo01_alpha.png"]
