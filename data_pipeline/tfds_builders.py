"""TFDS builders for the matting test sets, so evaluation data is prepared once, versioned
and reproducible. Both are "manual download" datasets: the user obtains the archives under
the datasets' licences, places them in the manual folder, and the builder composes the test
images exactly as the published protocol does.

  import data_pipeline.tfds_builders  # registers 'composition1k' and 'distinctions646'
  data_pipeline.tfds_builders.prepare("composition1k", MANUAL_DIR, DATA_DIR)  # once
  items = data_pipeline.evaluation.tfds_items("composition1k", DATA_DIR)

Config 'test' examples: `image` (H, W, 3) uint8 composite, `alpha` and `trimap` (H, W, 1)
uint8, `name`, `height`, `width`. Config 'foregrounds' (split 'train'): `foreground`,
`alpha`, `name`, `height`, `width`, for `build_source('tfds', ...)`. `prepare` writes the
array_record format, which both readers need for random access.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_pipeline.files import IMAGE_EXTENSIONS

_SIZES = {
    # Sizes, so evaluation can bucket images without decoding them.
    "height": tfds.features.Scalar(dtype=np.int32),
    "width": tfds.features.Scalar(dtype=np.int32),
}
_GREY = dict(shape=(None, None, 1), encoding_format="png")
TEST_FEATURES = {
    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
    "alpha": tfds.features.Image(**_GREY),
    "trimap": tfds.features.Image(**_GREY),
    "name": tfds.features.Text(),
    **_SIZES,
}
FOREGROUND_FEATURES = {
    "foreground": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
    "alpha": tfds.features.Image(**_GREY),
    "name": tfds.features.Text(),
    **_SIZES,
}
_CONFIGS = [
    tfds.core.BuilderConfig(name="test", description="The composited test images."),
    tfds.core.BuilderConfig(
        name="foregrounds",
        description="The training foregrounds and alphas (split 'train'), for "
                    "build_source('tfds', ...): composited on the fly on your backgrounds."),
]


def compose_like_adobe(fg: Image.Image, alpha: Image.Image, bg: Image.Image) -> np.ndarray:
  """The Deep Image Matting test composition (Adobe's released script).

  The background is enlarged (PIL bicubic, ceil) when smaller than the foreground in either
  direction, cropped at the top-left to the foreground's size, and each channel is
  int(a * fg + (1 - a) * bg) with a = alpha / 255 in double precision (fg where a >= 1,
  bg where a == 0).
  """
  fg = fg.convert("RGB")
  bg = bg.convert("RGB")
  width, height = fg.size
  bg_width, bg_height = bg.size
  ratio = max(width / bg_width, height / bg_height)
  if ratio > 1:
    bg = bg.resize((math.ceil(bg_width * ratio), math.ceil(bg_height * ratio)),
                   Image.BICUBIC)
  bg = np.asarray(bg.crop((0, 0, width, height)), np.float64)
  fg = np.asarray(fg, np.float64)
  a = np.asarray(alpha.convert("L"), np.float64)[..., None] / 255.0
  composite = np.floor(a * fg + (1.0 - a) * bg)
  composite = np.where(a >= 1.0, fg, np.where(a > 0.0, composite, bg))
  return composite.astype(np.uint8)


def _single_channel(path: pathlib.Path) -> np.ndarray:
  with Image.open(path) as image:
    return np.asarray(image.convert("L"))[..., None]


def _find_one(root: pathlib.Path, pattern: str, what: str) -> pathlib.Path:
  matches = sorted(root.glob(pattern))
  if not matches:
    raise FileNotFoundError(f"{what}: nothing matches {root / pattern}")
  return matches[0]


def _voc_images(manual_dir: pathlib.Path) -> pathlib.Path:
  return _find_one(manual_dir, "**/VOC2012/JPEGImages", "PASCAL VOC 2012 JPEGImages")


class _MattingBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Splits are built by generator helpers; this passes their examples through."""

  def _generate_examples(self, examples):
    yield from examples


class Composition1k(_MattingBuilder):
  """Composition-1k (Deep Image Matting): the 50 test foregrounds on 20 PASCAL VOC
  backgrounds each (config 'test'), and the 431 training foregrounds (config
  'foregrounds')."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Composited with the released Adobe test protocol."}
  BUILDER_CONFIGS = _CONFIGS
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Place in the manual folder (extracted, any depth):
    Combined_Dataset/  from the Adobe Deep Image Matting dataset (ask the authors):
      Test_set/test_fg_names.txt, Test_set/test_bg_names.txt,
      Test_set/Adobe-licensed images/{fg,alpha,trimaps}/
      Training_set/training_fg_names.txt,
      Training_set/{Adobe-licensed images,Other}/{fg,alpha}/   (config 'foregrounds')
    VOCdevkit/VOC2012/JPEGImages/  from VOCtrainval_11-May-2012.tar (config 'test')
  """

  def _info(self) -> tfds.core.DatasetInfo:
    features = TEST_FEATURES if self.builder_config.name == "test" else FOREGROUND_FEATURES
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features),
        homepage="https://sites.google.com/view/deepimagematting",
        description="Composition-1k (Xu et al., Deep Image Matting, CVPR 2017).")

  def _split_generators(self, dl_manager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    root = _find_one(manual_dir, "**/Combined_Dataset", "Combined_Dataset")
    if self.builder_config.name == "foregrounds":
      train = root / "Training_set"
      names = train.joinpath("training_fg_names.txt").read_text().split()
      groups = [train / "Adobe-licensed images", train / "Other"]
      pairs = []
      for name in names:
        group = next((g for g in groups if (g / "fg" / name).is_file()), None)
        if group is None:
          raise FileNotFoundError(f"training foreground {name} is in none of "
                                  f"{', '.join(str(g / 'fg') for g in groups)}")
        pairs.append((group / "fg" / name, group / "alpha" / name))
      return {"train": self._generate_examples(_generate_foregrounds(pairs))}
    test = root / "Test_set"
    adobe = test / "Adobe-licensed images"
    fg_names = test.joinpath("test_fg_names.txt").read_text().split()
    bg_names = test.joinpath("test_bg_names.txt").read_text().split()
    per_fg = len(bg_names) // len(fg_names)
    voc = _voc_images(manual_dir)
    cases = [(adobe / "fg" / name, adobe / "alpha" / name, adobe / "trimaps" / name,
              [voc / bg for bg in bg_names[i * per_fg:(i + 1) * per_fg]])
             for i, name in enumerate(fg_names)]
    return {"test": self._generate_examples(_generate_composites(cases))}


class Distinctions646(_MattingBuilder):
  """Distinctions-646: the 100 test foregrounds on 10 PASCAL VOC backgrounds each (config
  'test'), and the 596 training foregrounds (config 'foregrounds')."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Composited like Composition-1k, 10 backgrounds per foreground."}
  BUILDER_CONFIGS = _CONFIGS
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Place in the manual folder (extracted, any depth):
    Distinctions-646/Train/{FG,GT}/  (config 'foregrounds'; request the data from its authors)
    Distinctions-646/Test/{FG,GT,Trimap}/  (config 'test')
      optional Distinctions-646/Test/test_bg_names.txt: VOC background names, 10 per
      foreground in foreground name order; without it the first 10 x N VOC images in name
      order are used (the dataset publishes no list)
    VOCdevkit/VOC2012/JPEGImages/  (config 'test')
  """
  BACKGROUNDS_PER_FOREGROUND = 10

  def _info(self) -> tfds.core.DatasetInfo:
    features = TEST_FEATURES if self.builder_config.name == "test" else FOREGROUND_FEATURES
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features),
        homepage="https://github.com/yuhaoliu7456/CVPR2020-HAttMatting",
        description="Distinctions-646 (Qiao et al., Attention-Guided Hierarchical Structure "
                    "Aggregation for Image Matting, CVPR 2020).")

  def _split_generators(self, dl_manager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    root = _find_one(manual_dir, "**/Distinctions-646", "Distinctions-646")
    if self.builder_config.name == "foregrounds":
      foregrounds = _images(root / "Train" / "FG")
      return {"train": self._generate_examples(_generate_foregrounds(
          [(fg, _find_one(root / "Train" / "GT", f"{fg.stem}.*", f"alpha of {fg.name}"))
           for fg in foregrounds]))}
    test = root / "Test"
    voc = _voc_images(manual_dir)
    names_file = test / "test_bg_names.txt"
    bg_names = (names_file.read_text().split() if names_file.exists()
                else sorted(p.name for p in voc.glob("*.jpg")))
    per_fg = self.BACKGROUNDS_PER_FOREGROUND
    cases = []
    for i, fg in enumerate(_images(test / "FG")):
      cases.append((fg, _find_one(test / "GT", f"{fg.stem}.*", f"alpha of {fg.name}"),
                    _find_one(test / "Trimap", f"{fg.stem}.*", f"trimap of {fg.name}"),
                    [voc / bg for bg in bg_names[i * per_fg:(i + 1) * per_fg]]))
    return {"test": self._generate_examples(_generate_composites(cases))}


def _images(folder: pathlib.Path) -> list[pathlib.Path]:
  if not folder.is_dir():
    raise FileNotFoundError(f"folder {folder} does not exist")
  return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _generate_foregrounds(pairs):
  for fg_path, alpha_path in pairs:
    with Image.open(fg_path) as fg:
      foreground = np.asarray(fg.convert("RGB"))
    alpha = _single_channel(alpha_path)
    if alpha.shape[:2] != foreground.shape[:2]:
      raise ValueError(f"size mismatch: {fg_path} {foreground.shape[:2]} vs {alpha_path} "
                       f"{alpha.shape[:2]}")
    yield fg_path.stem, {"foreground": foreground, "alpha": alpha, "name": fg_path.stem,
                         "height": foreground.shape[0], "width": foreground.shape[1]}


def _generate_composites(cases):
  """cases: (fg path, alpha path, trimap path, [background paths]); one example each."""
  for fg_path, alpha_path, trimap_path, backgrounds in cases:
    alpha = _single_channel(alpha_path)
    trimap = _single_channel(trimap_path)
    with Image.open(fg_path) as fg, Image.open(alpha_path) as a:
      for j, bg_path in enumerate(backgrounds):
        with Image.open(bg_path) as bg:
          image = compose_like_adobe(fg, a, bg)
        name = f"{fg_path.stem}_{j}"
        yield name, {"image": image, "alpha": alpha, "trimap": trimap, "name": name,
                     "height": image.shape[0], "width": image.shape[1]}


BUILDERS = {"composition1k": Composition1k, "distinctions646": Distinctions646}


def prepare(name: str, manual_dir: str, data_dir: str, config: str = "test"
            ) -> tfds.core.DatasetBuilder:
  """Composes and writes a set (array_record, for random access by index)."""
  builder = load_builder(name, data_dir, config)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def load_builder(name: str, data_dir: str, config: str = "test") -> tfds.core.DatasetBuilder:
  if name not in BUILDERS:
    raise ValueError(f"unknown TFDS matting set {name!r}; expected one of "
                     f"{', '.join(BUILDERS)}")
  if config not in {c.name for c in _CONFIGS}:
    raise ValueError(f"unknown config {config!r}; expected 'test' or 'foregrounds'")
  return BUILDERS[name](data_dir=data_dir, config=config, file_format="array_record")
