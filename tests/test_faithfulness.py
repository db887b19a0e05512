"""The last details of the authors' code: images decoded as their `cv2.imread` decodes them,
PyTorch's transposed convolution and batch-norm statistics in the resamplers, and their
validation rule for choosing the best model."""

import io

import numpy as np
import pytest
from PIL import Image

from data_pipeline import files
from tests.conftest import SHARED

PHOTOS = SHARED / "data" / "alphamatting_lowres"


def _cv2():
  return pytest.importorskip("cv2", reason="the reference decoder, OpenCV (the train extra)")


def _tf_decode(path, channels):
  """The tf.data sources' decoder (FileSource and TfdsSource decode through it)."""
  pytest.importorskip("tensorflow", reason="the tf.data pipeline (the train extra)")
  import tensorflow as tf

  from data_pipeline.sources import FileSource

  decoded = FileSource._decode_bytes(tf.constant(path.read_bytes()), channels).numpy()
  return decoded if channels == 3 else decoded[..., 0]


def _assert_reads_like_cv2(path, *, tf_too=True):
  """Every project reader gives cv2.imread's pixels, in colour and as grey (the authors
  read foregrounds with cv2.imread(path) and alphas with cv2.imread(path, 0))."""
  cv2 = _cv2()
  colour = cv2.imread(str(path))[..., ::-1]
  grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
  np.testing.assert_array_equal(files.read_image(path, "rgb")[0], colour, err_msg=str(path))
  np.testing.assert_array_equal(files.read_image(path, "grey")[0], grey, err_msg=str(path))
  assert files.upright_size(path) == grey.shape
  if tf_too:
    np.testing.assert_array_equal(_tf_decode(path, 3), colour, err_msg=f"tf {path}")
    np.testing.assert_array_equal(_tf_decode(path, 1), grey, err_msg=f"tf {path}")


@pytest.mark.parametrize("quality", [50, 75, 90, 100])
def test_jpeg_copies_of_the_shared_photos_decode_as_cv2_imread(tmp_path, quality):
  if not PHOTOS.is_dir():
    pytest.skip(f"needs {PHOTOS} (shared real photographs, not shipped with the package)")
  for number in ("01", "05", "13"):
    with Image.open(PHOTOS / f"image_{number}.png") as im:
      photo = im.convert("RGB")
    with Image.open(PHOTOS / f"alpha_{number}.png") as im:
      alpha = im.convert("L")
    alpha.save(tmp_path / f"alpha_{number}.jpg", quality=quality)
    for subsampling, name in ((0, "444"), (2, "420")):
      # A photo (also read as grey: libjpeg's luma plane, not a mix of the decoded RGB),
      # and an alpha stored as a colour JPEG, as some training sets ship them.
      photo.save(tmp_path / f"photo_{number}_{name}.jpg", quality=quality,
                 subsampling=subsampling)
      alpha.convert("RGB").save(tmp_path / f"alpha_rgb_{number}_{name}.jpg", quality=quality,
                                subsampling=subsampling)
  for path in sorted(tmp_path.iterdir()):
    _assert_reads_like_cv2(path)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_images_upright_as_cv2_imread(tmp_path, orientation):
  rng = np.random.default_rng(orientation)
  image = Image.fromarray(rng.integers(0, 256, (24, 40, 3), np.uint8))
  exif = Image.Exif()
  exif[0x0112] = orientation  # EXIF Orientation
  image.save(tmp_path / "photo.jpg", quality=90, exif=exif.tobytes())
  image.save(tmp_path / "photo.png", exif=exif.tobytes())
  image.save(tmp_path / "photo.webp", lossless=True, exif=exif.tobytes())
  # A PNG may carry its eXIf chunk after the pixel data; OpenCV still honours it.
  _late_exif_png(image, exif.tobytes(), tmp_path / "late.png")
  for name in ("photo.jpg", "photo.png", "late.png"):
    _assert_reads_like_cv2(tmp_path / name)
  # TensorFlow cannot decode a WebP to one channel (cv2.imread can).
  _assert_reads_like_cv2(tmp_path / "photo.webp", tf_too=False)
  np.testing.assert_array_equal(_tf_decode(tmp_path / "photo.webp", 3),
                                files.read_image(tmp_path / "photo.webp", "rgb")[0])


def _late_exif_png(image, exif: bytes, path):
  import struct
  import zlib

  encoded = io.BytesIO()
  image.save(encoded, "PNG")
  data = encoded.getvalue()
  payload = exif[6:] if exif.startswith(b"Exif\x00\x00") else exif
  chunk = (struct.pack(">I", len(payload)) + b"eXIf" + payload +
           struct.pack(">I", zlib.crc32(b"eXIf" + payload)))
  end = data.rindex(b"IEND") - 4  # the IEND chunk's length field
  path.write_bytes(data[:end] + chunk + data[end:])


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".webp"])
def test_colour_files_read_as_grey_with_their_decoders_weights(tmp_path, suffix):
  colours = np.random.default_rng(0).integers(0, 256, (512, 512, 3), np.uint8)
  path = tmp_path / f"colours{suffix}"
  Image.fromarray(colours).save(path, **({"lossless": True} if suffix == ".webp" else {}))
  _assert_reads_like_cv2(path, tf_too=suffix == ".png")


def test_sixteen_bit_files_keep_the_high_byte_as_cv2_imread(tmp_path):
  Image.fromarray(np.arange(65536, dtype=np.uint16).reshape(256, 256)).save(
      tmp_path / "grey16.png")
  _assert_reads_like_cv2(tmp_path / "grey16.png")


# ------------------------------------------------------------------- transposed convolution


def _torch_conv_transpose2d(x, weight, bias, stride, padding, output_padding):
  """PyTorch's ConvTranspose2d by its definition, NCHW: every input pixel scatters
  weight[c_in] * x into the output at stride * i + (tap) - padding; output_padding adds
  rows/columns at the bottom/right (zero before the bias where no tap reaches them)."""
  n, _, height, width = x.shape
  k = weight.shape[2]
  full = np.zeros((n, weight.shape[1], (height - 1) * stride + k + output_padding,
                   (width - 1) * stride + k + output_padding))
  for i in range(height):
    for j in range(width):
      full[:, :, i * stride:i * stride + k, j * stride:j * stride + k] += np.einsum(
          "nc,cokl->nokl", x[:, :, i, j], weight)
  out_h = (height - 1) * stride - 2 * padding + k + output_padding
  out_w = (width - 1) * stride - 2 * padding + k + output_padding
  return full[:, :, padding:padding + out_h, padding:padding + out_w] + bias[:, None, None]


def test_deconv_is_pytorchs_exact_2x_transposed_convolution_for_odd_and_even_kernels():
  import jax
  import jax.numpy as jnp

  from a2u_jax import resamplers

  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 6, 3))
  for k in range(1, 7):
    weight = rng.standard_normal((3, 3, k, k))  # PyTorch's layout: (in, out, k, k)
    bias = rng.standard_normal(3)
    expected = _torch_conv_transpose2d(x.transpose(0, 3, 1, 2), weight, bias, 2,
                                       (k - 1) // 2, k % 2)
    kernel = weight[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)  # (k, k, in, out), flipped
    variables = {"params": {"deconv": {"kernel": kernel, "bias": bias}}}
    with jax.enable_x64(True):
      out = resamplers.make_resampler("deconv", kernel_size=k).up().apply(
          jax.tree.map(jnp.asarray, variables), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), expected, rtol=1e-12,
                               atol=1e-12, err_msg=f"kernel_size={k}")


# ------------------------------------------------------------------ batch-norm statistics


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
@pytest.mark.parametrize("index", ["holistic", "depthwise_o2o", "depthwise_m2o"])
def test_indexnet_running_statistics_follow_pytorchs_rule_across_devices(index):
  """After a training step, every index block's BatchNorm holds PyTorch's running statistics
  (momentum 0.1, unbiased variance over the whole synchronised batch), as IndexNet's
  BatchNorm2d / SynchronizedBatchNorm2d do."""
  import flax.linen as nn
  import jax

  from a2u_jax import resamplers

  devices, per_device = 2, 2
  x = jax.random.normal(jax.random.key(0), (devices, per_device, 8, 8, 16)) * 3 + 1
  down = resamplers.make_resampler("indexnet", index=index, axis_name="devices").down()
  variables = down.init(jax.random.key(1), x[0])
  # Non-trivial running statistics to start from.
  variables["batch_stats"] = jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])

  def step(x):
    return down.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                      capture_intermediates=lambda module, _: isinstance(module, nn.Conv))[1]

  updates = jax.vmap(step, axis_name="devices")(x)
  blocks = [name[:-3] for name in variables["batch_stats"]]
  assert blocks, "the nonlinear index blocks have a BatchNorm"
  for block in blocks:
    normalised = np.asarray(updates["intermediates"][f"{block}_conv"]["__call__"][0],
                            np.float64)  # (devices, per_device, h, w, C): the BN's input
    values = normalised.reshape(-1, normalised.shape[-1])
    before = variables["batch_stats"][f"{block}_bn"]
    after = jax.tree.map(lambda v: np.asarray(v)[0], updates["batch_stats"][f"{block}_bn"])
    np.testing.assert_allclose(after["mean"], 0.9 * before["mean"] + 0.1 * values.mean(0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after["var"], 0.9 * before["var"] + 0.1 * values.var(0, ddof=1),
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ validation


def _authors_validation_sad(output, gt_file_values, trimap):
  """The authors' trainval.py validate() and utils.compute_sad_loss for one image, as they
  run them (NumPy/OpenCV, float32): `output` is the network's cropped float32 output."""
  cv2 = _cv2()
  alpha = np.clip(output, 0, 1) * 255.
  trimap = trimap.astype("float32")
  mask = np.equal(trimap, 128).astype(np.float32)
  alpha = (1 - mask) * trimap + mask * alpha
  gt_alpha = (gt_file_values.astype(np.float32) / 255.) * 255.
  cv2.normalize(alpha, alpha, 0.0, 255.0, cv2.NORM_MINMAX, dtype=cv2.CV_32F)
  cv2.normalize(gt_alpha, gt_alpha, 0.0, 255.0, cv2.NORM_MINMAX, dtype=cv2.CV_32F)
  error_map = np.abs(alpha - gt_alpha) / 255.
  return float(np.sum(error_map * mask) / 1000)


def _validation_cases(rng):
  """(network output, ground truth, trimap): an ordinary image; one whose ground truth
  never reaches 255 (the authors' stretch rescales it); one whose trimap has no definite
  foreground (the prediction is stretched too); one with a constant ground truth."""
  cases = []
  for top, trimap_values in ((255, (0, 128, 255)), (200, (0, 128, 255)), (255, (0, 128)),
                             (0, (0, 128))):
    shape = (24, 30)  # one padded shape: evaluation batches keep the items' order
    trimap = rng.choice(np.array(trimap_values, np.uint8), shape)
    gt = rng.integers(0, top + 1, shape).astype(np.uint8)
    output = rng.normal(0.5, 0.4, shape).astype(np.float32)
    cases.append((output, gt, trimap))
  return cases


def test_authors_sad_rule_is_their_validation_sad_bit_for_bit():
  cv2 = _cv2()
  from a2u_jax import inputs, sad_rules

  rng = np.random.default_rng(0)
  for _ in range(20):  # OpenCV's normalize on arbitrary float32 ranges
    values = rng.uniform(*sorted(rng.uniform(-5, 300, 2)), (17, 23)).astype(np.float32)
    expected = cv2.normalize(values, None, 0.0, 255.0, cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    np.testing.assert_array_equal(sad_rules.normalize_minmax(values), expected)
  for output, gt, trimap in _validation_cases(rng):
    alpha = np.asarray(inputs.postprocess_alpha(output[..., None], trimap[..., None]))[..., 0]
    assert sad_rules.authors_sad(alpha, gt, trimap) == _authors_validation_sad(output, gt,
                                                                               trimap)


class _FixedPredictor:
  """Stands in for predict.Predictor: the post-processed alphas of given network outputs."""

  def __init__(self, outputs):
    from types import SimpleNamespace

    self.runtime = SimpleNamespace(local_devices=1)
    self.outputs = iter(outputs)

  def __call__(self, image, trimap):
    from a2u_jax import inputs

    output = next(self.outputs)
    padded = np.zeros(trimap.shape, np.float32)
    padded[0, :output.shape[0], :output.shape[1], 0] = output
    return np.asarray(inputs.postprocess_alpha(padded, trimap))


def test_validation_chooses_by_the_configured_rule_and_the_paper_config_is_the_authors():
  from a2u_jax import inputs, metrics
  from a2u_jax.training import loop
  from configs import a2u_matting, smoke
  from data_pipeline import evaluation

  cases = _validation_cases(np.random.default_rng(1))
  items = [evaluation.array_item(f"case{i}", np.zeros(gt.shape + (3,), np.uint8), trimap, gt)
           for i, (_, gt, trimap) in enumerate(cases)]
  outputs = [output for output, _, _ in cases]
  authors = loop.validate(_FixedPredictor(outputs), items, 1, "authors")
  matlab = loop.validate(_FixedPredictor(outputs), items, 1, "matlab")
  assert authors["sad"] == np.mean([_authors_validation_sad(*case) for case in cases])
  saved = [inputs.quantize_alpha(np.asarray(inputs.postprocess_alpha(
      output[..., None], trimap[..., None]))[..., 0]) for output, _, trimap in cases]
  assert matlab["sad"] == np.mean([metrics.sad(alpha, gt, trimap)
                                   for alpha, (_, gt, trimap) in zip(saved, cases)])
  assert authors["sad"] != matlab["sad"] and authors["mse"] == matlab["mse"]

  paper = a2u_matting.get_config()
  assert paper.validation.sad_rule == "authors"
  # Every epoch: 6000 iterations, the authors' epoch, and it follows steps_per_epoch.
  assert loop._validation_interval(paper) == paper.steps_per_epoch == 6000
  paper.steps_per_epoch = 7
  assert loop._validation_interval(paper) == 7
  assert loop._validation_interval(smoke.get_config()) == 10


def test_composition1k_validation_reads_its_folder_or_tfds_set(tmp_path):
  from a2u_jax.training import loop
  from configs import a2u_matting

  config = a2u_matting.get_config()
  config.validation.source = "composition1k"
  with pytest.raises(ValueError, match="needs config.validation.data_dir"):
    loop._validation_items(config)
  rng = np.random.default_rng(2)
  for folder in ("image", "trimap", "alpha"):
    (tmp_path / "comp1k" / folder).mkdir(parents=True)
    for name in ("a", "b"):
      values = rng.choice(np.array([0, 128, 255], np.uint8), (16, 24))
      Image.fromarray(np.dstack([values] * 3) if folder == "image" else values).save(
          tmp_path / "comp1k" / folder / f"{name}.png")
  config.validation.data_dir = str(tmp_path / "comp1k")
  assert [item.name for item in loop._validation_items(config)] == ["a", "b"]
  config.validation.data_dir = str(tmp_path / "tfds")  # not a folder set: the TFDS builder
  pytest.importorskip("tensorflow_datasets", reason="the TFDS builders (the train extra)")
  with pytest.raises(ValueError, match="composition1k is not prepared in"):
    loop._validation_items(config)
  config.validation.sad_rule = "nope"
  with pytest.raises(ValueError, match="config.validation.sad_rule must be one of"):
    loop._validation_items(config)
