"""Matting data: one training protocol, two executors of it, the sources they read, and the
evaluation sets.

  protocol      the Deep Image Matting protocol once: constants, random decisions per
                (seed, example index), the global stream's order
  catalog       the training sources, declared once: synthetic, adobe, d646, folder, tfds
  tf executor   source = build_source(name, **options); train_batches(source, batch_size=,
                crop_size=, seed=, shard_index=, num_shards=, skip_batches=): the reference
                (tf.data; composition, sources, training; needs 'a2u-jax[train]')
  jax executor  jax_pipeline.JaxStream(jax_pipeline.host_source(name, **options), ...)
                .batches(): the host reads, the device composites (jax_composition); no TF
  evaluation    folder_items | alphamatting_items | tfds_items | synthetic_items, then
                eval_batches(items, batch_size=): full resolution, shape buckets

Both executors give example k the same decisions, so the same seed gives the same alphas
and trimaps. Names resolve on first use: `import data_pipeline` imports no TensorFlow (the
tf.data names import it when first touched and say how to install it), and the package never
imports `a2u_jax` (the network's input encoding is `a2u_jax.inputs.model_inputs`).
"""

from __future__ import annotations

import importlib

from data_pipeline.catalog import SOURCES
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
    "ArraySource": "data_pipeline.sources",
    "FileSource": "data_pipeline.sources",
    "Source": "data_pipeline.sources",
    "TfdsSource": "data_pipeline.sources",
    "split_for_devices": "data_pipeline.training",
    "train_batches": "data_pipeline.training",
    "train_dataset": "data_pipeline.training",
}
# Names that went, and what replaced them (one line instead of an AttributeError).
_REMOVED = {
    "SyntheticStream": "data_pipeline.SyntheticStream (the NumPy stream) was removed: use "
                       "jax_pipeline.JaxStream(jax_pipeline.host_source('synthetic', ...)) "
                       "(same synthetic source, the whole protocol, no TensorFlow)",
    **{f"{name}_source": f"data_pipeline.{name}_source was removed: use "
                         f"data_pipeline.build_source({name!r}, ...) (tf.data) or "
                         f"jax_pipeline.host_source({name!r}, ...)"
       for name in SOURCES},
}


def require_tensorflow(what: str) -> None:
  """ImportError saying that `what` needs the `train` extra, unless TensorFlow imports."""
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    raise ImportError(f"{what} {TENSORFLOW_HINT}") from None


def __getattr__(name: str):
  if name in _REMOVED:
    raise AttributeError(_REMOVED[name])
  if name not in _LAZY:
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
  module = _LAZY[name]
  if module in ("data_pipeline.sources", "data_pipeline.training"):
    require_tensorflow(f"data_pipeline.{name} (the tf.data pipeline)")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value
  return value


def build_source(name: str, **options):
  """The tf.data readers of source `name` (`catalog.SOURCES`) with that declaration's
  options (e.g. `root=`, `background_dir=`), checked there."""
  from data_pipeline import catalog

  declare = catalog.declaration(name)  # an unknown name is refused before TF is asked for
  require_tensorflow(f"data source {name!r} (the tf.data pipeline)")
  from data_pipeline import sources
  return sources.from_catalog(declare(**options))


__all__ = ["IMAGE_EXTENSIONS", "SOURCES", "SourceError", "build_source",
           "require_tensorflow", *_LAZY]
