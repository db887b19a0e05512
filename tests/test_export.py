"""a2u-export: the serialized jax.export artifact, its description, and running it with
a2u-predict --exported and, without any of this code, in a fresh process."""

import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from a2u_jax import checkpointing, export, inputs, ops, predict
from tests.conftest import SHARED

PHOTOS = SHARED / "data" / "alphamatting_lowres"
# Two shared photos shrunk (PIL sizes: width, height) to two padded shapes, 48x64 and 80x48.
SIZES = {"01": (64, 40), "03": (44, 70)}


def _pytorch_bins(size, bins):
  """PyTorch's AdaptiveAvgPool bins as a float64 (bins, size) averaging matrix."""
  matrix = np.zeros((bins, size))
  for i in range(bins):
    start, stop = int(np.floor(i * size / bins)), int(np.ceil((i + 1) * size / bins))
    matrix[i, start:stop] = 1 / (stop - start)
  return matrix


def test_adaptive_pooling_traces_with_symbolic_sizes():
  # What lets the network export with a symbolic height and width: ops builds the
  # averaging matrices from traced sizes, and, traced symbolically, they are exactly the
  # concrete ones, which are PyTorch's bins with float32 weights.
  size, = jax.export.symbolic_shape("size")
  for bins in (1, 4, 6, 7):  # 6 is A2U's k
    exported = jax.export.export(jax.jit(
        lambda row, bins=bins: ops.adaptive_avg_pool_matrix(row.shape[0], bins)))(
            jax.ShapeDtypeStruct((size,), jnp.float32))
    for n in [*range(1, 14), 40, 250]:
      expected = _pytorch_bins(n, bins).astype(np.float32)
      np.testing.assert_array_equal(ops.adaptive_avg_pool_matrix(n, bins), expected,
                                    err_msg=f"size {n}, bins {bins}")
      np.testing.assert_array_equal(exported.call(jnp.zeros(n)), expected,
                                    err_msg=f"symbolic size {n}, bins {bins}")
  h, w = jax.export.symbolic_shape("h, w")
  pool = jax.export.export(jax.jit(lambda x: ops.adaptive_avg_pool(x, 6)))(
      jax.ShapeDtypeStruct((2, h, w, 32), jnp.float32))
  x = jax.random.normal(jax.random.key(0), (2, 40, 24, 32))
  np.testing.assert_array_equal(pool.call(x), ops.adaptive_avg_pool(x, 6))


@pytest.fixture(scope="module")
def exported(converted_checkpoint, tmp_path_factory):
  """(checkpoint, artifact): the random converted network with its last layer scaled so
  its alphas lie inside (0, 1) (the random weights alone give ~2e-5, which any program
  would quantise to the same zeros), exported by the CLI for the CPU and CUDA."""
  _, variables = checkpointing.load_model_checkpoint(converted_checkpoint)
  variables = jax.tree.map(np.asarray, variables)
  variables["params"]["head_out"]["kernel"] = variables["params"]["head_out"]["kernel"] * 2e4
  folder = tmp_path_factory.mktemp("export")
  checkpoint = checkpointing.save_model_checkpoint(
      folder / "model", variables, {"resampler": "a2u", "resampler_options": {"share": True}})
  export.main(["--checkpoint", str(checkpoint), "--out", str(folder / "a2u.jaxexport"),
               "--platforms", "cpu,cuda"])
  return checkpoint, folder / "a2u.jaxexport"


def test_the_description_says_how_to_call_it_and_where_it_came_from(exported):
  checkpoint, artifact = exported
  description = json.loads(export.description_path(artifact).read_text())
  assert description["platforms"] == ["cpu", "cuda"]
  image, trimap = description["inputs"]
  assert (image["name"], image["dtype"], image["range"]) == ("image", "float32", [0.0, 1.0])
  assert image["shape"] == ["batch", "16*h", "16*w", "3"]
  assert (trimap["dtype"], trimap["values"], trimap["shape"][3]) == ("uint8", [0, 128, 255], "1")
  assert description["output"]["shape"] == ["batch", "16*h", "16*w", "1"]
  assert description["model"]["resampler"] == "a2u"
  assert description["model"]["resampler_options"] == {"share": True}
  assert description["checkpoint"] == str(checkpoint)
  assert description["artifact"] == "a2u.jaxexport"
  loaded, again = export.load_exported(artifact)
  assert again == description and loaded.platforms == ("cpu", "cuda")
  assert [str(aval.dtype) for aval in loaded.in_avals] == ["float32", "uint8"]


def test_the_artifact_refuses_sizes_that_are_not_multiples_of_16(exported):
  loaded, _ = export.load_exported(exported[1])
  with pytest.raises(ValueError, match="Division had remainder 8 when computing the value "
                                       "of 'h'"):
    loaded.call(np.zeros((1, 40, 48, 3), np.float32), np.zeros((1, 40, 48, 1), np.uint8))


def test_export_refuses_to_overwrite_and_names_bad_arguments(exported, tmp_path, capsys):
  checkpoint, artifact = exported
  for argv, message in (
      (["--out", str(artifact)], f"{artifact} and {artifact}.json exist; pass force=True "
                                 f"(--force) to replace"),
      (["--out", str(tmp_path / "a"), "--platforms", "cpu,gpu"],
       "platforms: gpu; choose from cpu, cuda, rocm, tpu"),
      (["--out", str(tmp_path)], f"--out {tmp_path}: is a folder"),
  ):
    with pytest.raises(SystemExit) as exit_:
      export.main(["--checkpoint", str(checkpoint), *argv])
    assert str(exit_.value).startswith("error: ") and message in str(exit_.value)
  assert not any(tmp_path.iterdir())


def test_a_description_that_does_not_belong_to_the_file_is_refused(exported, tmp_path):
  artifact = tmp_path / "copy.jaxexport"
  artifact.write_bytes(exported[1].read_bytes())
  described = json.loads(export.description_path(exported[1]).read_text())
  with pytest.raises(FileNotFoundError, match="copy.jaxexport.json: not found"):
    export.load_exported(artifact)
  with pytest.raises(SystemExit, match=r"^error: .*copy.jaxexport.json: not found \(a2u-export "
                                       r"writes copy.jaxexport and copy.jaxexport.json side"):
    predict.main(["--exported", str(artifact), "--image", str(tmp_path / "a.png"), "--trimap",
                  str(tmp_path / "b.png"), "--out", str(tmp_path / "out")])
  for change, message in (({"sha256": "0" * 64}, "its SHA-256 is not the one copy.jaxexport"
                                                 ".json records"),
                          ({"format_version": 2}, "format_version 2 is not one this a2u-jax "
                                                  "reads")):
    export.description_path(artifact).write_text(json.dumps({**described, **change}))
    with pytest.raises(ValueError, match=message):
      export.load_exported(artifact)


# A serving program: reads the artifact and the photos, pads as a2u-predict does, and never
# imports a2u_jax, Flax or the repository's data code.
_FRESH_PROCESS = """
    import sys
    import numpy as np
    from jax import export
    from PIL import Image

    artifact, out, *pairs = sys.argv[1:]
    with open(artifact, "rb") as file:
      exported = export.deserialize(bytearray(file.read()))
    alphas = {}
    for image_path, trimap_path in zip(pairs[::2], pairs[1::2]):
      image = np.asarray(Image.open(image_path).convert("RGB"), np.float32) / 255.0
      trimap = np.asarray(Image.open(trimap_path).convert("L"))
      height, width = trimap.shape
      pad = ((0, -height % 16), (0, -width % 16))
      image = np.pad(image, pad + ((0, 0),), mode="reflect")
      trimap = np.pad(trimap, pad, mode="reflect")[..., None]
      # A batch of two: the batch is symbolic too.
      alpha = np.asarray(exported.call(np.stack([image, image]), np.stack([trimap, trimap])))
      alphas[image_path] = alpha[:, :height, :width, 0]
    np.savez(out, *[alphas[path] for path in pairs[::2]])
    imported = {name.split(".")[0] for name in sys.modules}
    assert not imported & {"a2u_jax", "flax", "data_pipeline"}, imported
    """


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[tuple[pathlib.Path, pathlib.Path]]:
  if not PHOTOS.is_dir():
    pytest.skip(f"needs {PHOTOS} (shared real photographs, not shipped with the package)")
  root = tmp_path_factory.mktemp("photos")
  pairs = []
  for number, size in SIZES.items():
    for kind, mode, resample in (("image", "RGB", Image.BILINEAR),
                                 ("trimap", "L", Image.NEAREST)):
      (root / kind).mkdir(exist_ok=True)
      with Image.open(PHOTOS / f"{kind}_{number}.png") as im:
        im.convert(mode).resize(size, resample).save(root / kind / f"photo{number}.png")
    pairs.append((root / "image" / f"photo{number}.png", root / "trimap" / f"photo{number}.png"))
  return pairs


def _assert_same_alpha(actual: np.ndarray, expected: np.ndarray, trimap: np.ndarray) -> None:
  """Equal up to float32 rounding (the shape-polymorphic program sums in another order):
  within 1e-5, and the saved 8-bit alphas equal but for rare flips at a level boundary."""
  unknown = trimap == 128
  assert 0.05 < expected[unknown].mean() < 0.95  # not a trivially saturated alpha
  np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)
  flips = inputs.quantize_alpha(actual).astype(int) - inputs.quantize_alpha(expected)
  assert np.abs(flips).max() <= 1 and np.mean(flips != 0) <= 0.01


@pytest.mark.slow  # 17-26 s on two cores: the network compiled twice here and twice there
def test_the_artifact_gives_predicts_alphas_in_a_process_without_the_model_code(
    photos, exported, tmp_path):
  checkpoint, artifact = exported
  predictor = predict.Predictor(*checkpointing.load_model_checkpoint(checkpoint))
  expected = [predict.predict_alpha(predictor, *predict.read_pair(*pair, False)[:2])
              for pair in photos]
  process = subprocess.run(
      [sys.executable, "-c", textwrap.dedent(_FRESH_PROCESS), str(artifact),
       str(tmp_path / "alphas.npz"), *[str(p) for pair in photos for p in pair]],
      cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
  assert process.returncode == 0, process.stderr[-3000:]
  with np.load(tmp_path / "alphas.npz") as fresh:
    for index, (_, trimap_path) in enumerate(photos):
      trimap = np.asarray(Image.open(trimap_path))
      for row in fresh[f"arr_{index}"]:
        _assert_same_alpha(row, expected[index], trimap)


def test_predict_runs_the_artifact_with_exported(exported, tmp_path):
  checkpoint, artifact = exported
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (37, 50, 3), np.uint8)).save(tmp_path / "image.png")
  trimap = np.full((37, 50), 128, np.uint8)
  trimap[:, :10], trimap[:, -10:] = 0, 255
  Image.fromarray(trimap).save(tmp_path / "trimap.png")
  for flag, path in (("--checkpoint", checkpoint), ("--exported", artifact)):
    predict.main([flag, str(path), "--image", str(tmp_path / "image.png"), "--trimap",
                  str(tmp_path / "trimap.png"), "--out", str(tmp_path / flag[2:])])
  through_checkpoint, through_artifact = (
      np.asarray(Image.open(tmp_path / out / "image_alpha.png")).astype(int)
      for out in ("checkpoint", "exported"))
  assert 10 < through_checkpoint[trimap == 128].mean() < 245  # not a saturated alpha
  flips = through_artifact - through_checkpoint
  assert np.abs(flips).max() <= 1 and np.mean(flips != 0) <= 0.01
  assert (tmp_path / "exported" / "image_preview.png").exists()
