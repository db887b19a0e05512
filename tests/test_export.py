"""a2u-export: the serialized jax.export artifact, its description, and running it with
a2u-predict --exported and, without any of this code, in a fresh process."""

import dataclasses
import hashlib
import json
import os
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
from tests import in_process
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


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
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


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
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


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
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


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
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


def _remake_description(artifact: pathlib.Path, data: bytes, like: pathlib.Path) -> None:
  """Writes `data` to `artifact` with a copy of `like`'s description whose digest is
  `data`'s (as someone who "repairs" a description by hand would)."""
  artifact.write_bytes(data)
  described = json.loads(export.description_path(like).read_text())
  export.description_path(artifact).write_text(json.dumps(
      {**described, "artifact": artifact.name, "sha256": hashlib.sha256(data).hexdigest()}))


def _damaged(data: bytes, how: str) -> bytes:
  """`data` damaged `how`, each at a place where this JAX must notice it: truncated,
  emptied, a bit flipped in the StableHLO module's header, or in the signature."""
  if how == "truncated":
    return data[:len(data) // 2]
  if how == "empty":
    return b""
  module = bytes(jax.export.deserialize(bytearray(data)).mlir_module_serialized)
  at = data.find(module[:256]) + 2 if how == "module_bit_flipped" else data.find(b"16*h")
  assert at >= 2
  return data[:at] + bytes([data[at] ^ 0x08]) + data[at + 1:]


def _predict_exported(artifact: pathlib.Path, tmp_path: pathlib.Path,
                      own_process: bool = False) -> subprocess.CompletedProcess:
  """a2u-predict --exported ARTIFACT on a 20x24 image into tmp_path/out: in this process
  (`in_process`), or in its own where the refusal's exact stderr is under test."""
  trimap = np.full((20, 24), 128, np.uint8)
  trimap[:5] = 0
  Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "image.png")
  Image.fromarray(trimap).save(tmp_path / "trimap.png")
  argv = ["--exported", str(artifact), "--image", str(tmp_path / "image.png"), "--trimap",
          str(tmp_path / "trimap.png"), "--out", str(tmp_path / "out")]
  if not own_process:
    return in_process.run_main(predict.main, "predict.py", argv)
  return subprocess.run(
      [sys.executable, "-m", "a2u_jax.predict", *argv], cwd=pathlib.Path(__file__).parents[1],
      capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _assert_one_line_refusal(process: subprocess.CompletedProcess, start: str, end: str,
                             tmp_path: pathlib.Path) -> None:
  lines = process.stderr.strip().splitlines()
  assert process.returncode != 0 and "Traceback" not in process.stderr, process.stderr[-3000:]
  assert len(lines) == 1, process.stderr[-3000:]
  assert lines[0].startswith(start) and lines[0].endswith(end), lines[0]
  assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("how", ["truncated", "empty", "module_bit_flipped",
                                 "signature_bit_flipped"])
def test_a_damaged_artifact_with_a_remade_description_is_refused_in_one_line(
    exported, how, tmp_path):
  artifact = tmp_path / "damaged.jaxexport"
  _remake_description(artifact, _damaged(exported[1].read_bytes(), how), exported[1])
  # Every refusal of this file goes through predict's one error line; the truncated
  # artifact shows it in a2u-predict's own process.
  _assert_one_line_refusal(
      _predict_exported(artifact, tmp_path, own_process=how == "truncated"),
      f"error: {artifact}: damaged, or written by a JAX this one ({jax.__version__}) cannot "
      f"run (", "); export the model again", tmp_path)


def test_an_interrupted_copy_is_refused_in_one_line(exported, tmp_path):
  artifact = tmp_path / "copy.jaxexport"
  artifact.write_bytes(exported[1].read_bytes()[:1000])
  export.description_path(artifact).write_text(
      export.description_path(exported[1]).read_text())
  _assert_one_line_refusal(
      _predict_exported(artifact, tmp_path),
      f"error: {artifact}: its SHA-256 is not the one copy.jaxexport.json records",
      "; export the model again", tmp_path)


def _stand_in(platforms: tuple[str, ...]) -> jax.export.Exported:
  """A function of the artifact's signature (the mean of the colour channels as alpha),
  lowered for `platforms`: cheap to export and to run."""
  batch, h, w = jax.export.symbolic_shape("batch, h, w")
  return jax.export.export(
      jax.jit(lambda image, trimap: jnp.mean(image, axis=-1, keepdims=True)),
      platforms=platforms)(jax.ShapeDtypeStruct((batch, 16 * h, 16 * w, 3), jnp.float32),
                           jax.ShapeDtypeStruct((batch, 16 * h, 16 * w, 1), jnp.uint8))


def test_an_artifact_for_other_platforms_is_refused_in_one_line(tmp_path):
  artifact = export.save_exported(tmp_path / "tpu.jaxexport", _stand_in(("tpu",)),
                                  {"format_version": export.FORMAT_VERSION})
  _assert_one_line_refusal(
      _predict_exported(artifact, tmp_path),
      f"error: {artifact}: lowered for tpu, not for this machine's cpu; export it again "
      f"with --platforms cpu", "cpu", tmp_path)


def test_unsupported_calling_conventions_and_other_signatures_are_refused(tmp_path,
                                                                        monkeypatch):
  artifact = export.save_exported(tmp_path / "a.jaxexport", _stand_in(("cpu",)),
                                  {"format_version": export.FORMAT_VERSION})
  loaded, _ = export.load_exported(artifact)
  assert loaded.call(np.ones((1, 16, 16, 3), np.float32),
                     np.zeros((1, 16, 16, 1), np.uint8)).shape == (1, 16, 16, 1)
  sine = jax.export.export(jax.jit(jnp.sin))(jax.ShapeDtypeStruct((3,), jnp.float32))
  other = export.save_exported(tmp_path / "sine.jaxexport", sine,
                               {"format_version": export.FORMAT_VERSION})
  with pytest.raises(ValueError, match=r"sine.jaxexport: damaged, .* cannot run \(its inputs "
                                       r"and output are \[\{'shape': \['3'\]"):
    export.load_exported(other)
  deserialize = jax.export.deserialize
  newest = jax.export.maximum_supported_calling_convention_version
  monkeypatch.setattr(jax.export, "deserialize", lambda blob: dataclasses.replace(
      deserialize(blob), calling_convention_version=newest + 1))
  with pytest.raises(ValueError, match=rf"a.jaxexport: damaged, or written by a JAX this one "
                                       rf".* cannot run \(calling convention version "
                                       rf"{newest + 1}, not \d+ to {newest}\); export"):
    export.load_exported(artifact)
