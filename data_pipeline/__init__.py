"""Matting data: the tf.data compositing pipeline, evaluation sets, and a NumPy synthetic
stream for machines without TensorFlow.

Training (tf.data, needs the `train` extra: `pip install 'a2u-jax[train]'`):
  source = build_source(name, **options)   'synthetic', 'adobe', 'd646', 'folder', 'tfds'
  batches = train_batches(source, batch_size=16, crop_size=512, seed=0,
                          shard_index=0, num_shards=1)
  split_for_devices(batch, num_devices)    host batch -> (devices, per_device, ...)
Training without TensorFlow (synthetic data only, same batch contract):
  SyntheticStream(**synthetic options).batches(batch_size=..., crop_size=..., seed=...)
Evaluation (no TensorFlow, except for the TFDS sets):
  items = folder_items(root) | alphamatting_items(root) | tfds_items(name, data_dir)
          | synthetic_items()
  eval_batches(items, batch_size=...)      full resolution, reflect-padded, shape buckets

Names are resolved on first use, so `import data_pipeline` (and everything evaluation and
the synthetic stream need) does not import TensorFlow; the tf.data names import it when
they are first touched, and say how to install it when it is missing. The package never
imports `a2u_jax`: the network's input encoding is `a2u_jax.inputs.model_inputs`.
"""

from __future__ import annotations

import importlib

from data_pipeline.files import IMAGE_EXTENSIONS, SourceError

TENSORFLOW_HINT = ("needs TensorFlow and TensorFlow Datasets, which the core install "
                   "leaves out: pip install 'a2u-jax[train]'")

_LAZY = {
    "EvalItem": "data_pipeline.evaluation",
    "alphamatting_items": "data_pipeline.evaluation",
    "array_item": "data_pipeline.evaluation",
    "eval_batches": "data_pipeline.evaluation",
    "folder_items": "data_pipeline.evaluation",
    "num_buckets": "data_pipeline.evaluation",
    "synthetic_items": "data_pipeline.evaluation",
    "tfds_items": "data_pipeline.evaluation",
    "SyntheticStream": "data_pipeline.synthetic_stream",
    "ArraySource": "data_pipeline.sources",
    "FileSource": "data_pipeline.sources",
    "Source": "data_pipeline.sources",
    "TfdsSource": "data_pipeline.sources",
    "adobe_source": "data_pipeline.sources",
    "d646_source": "data_pipeline.sources",
    "folder_source": "data_pipeline.sources",
    "synthetic_source": "data_pipeline.sources",
    "tfds_source": "data_pipeline.sources",
    "split_for_devices": "data_pipeline.training",
    "train_batches": "data_pipeline.training",
    "train_dataset": "data_pipeline.training",
}
SOURCES = ("synthetic", "adobe", "d646", "folder", "tfds")


def require_tensorflow(what: str) -> None:
  """ImportError saying that `what` needs the `train` extra, unless TensorFlow imports."""
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    raise ImportError(f"{what} {TENSORFLOW_HINT}") from None


def __getattr__(name: str):
  if name not in _LAZY:
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
  module = _LAZY[name]
  if module in ("data_pipeline.sources", "data_pipeline.training"):
    require_tensorflow(f"data_pipeline.{name} (the tf.data pipeline)")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value
  return value


def build_source(name: str, **options):
  """A tf.data training source by name: 'synthetic', 'adobe', 'd646', 'folder' or 'tfds'.

  Options are those of the matching `*_source` function (e.g. `root=`, `background_dir=`).
  """
  if name not in SOURCES:
    raise ValueError(f"unknown source {name!r}; expected one of {', '.join(SOURCES)}")
  require_tensorflow(f"data source {name!r} (the tf.data pipeline)")
  from data_pipeline import sources
  return getattr(sources, f"{name}_source")(**options)


__all__ = ["IMAGE_EXTENSIONS", "SOURCES", "SourceError", "build_source",
           "require_tensorflow", *_LAZY]
