"""tf.data compositing pipeline for matting: sources, the Deep Image Matting training
protocol, and evaluation loading.

Training:
  source = build_source(name, **options)   'synthetic', 'adobe', 'd646', 'folder', 'tfds'
  batches = train_batches(source, batch_size=16, crop_size=512, seed=0,
                          shard_index=0, num_shards=1)
  split_for_devices(batch, num_devices)    host batch -> (devices, per_device, ...)
  model_inputs(image, trimap)              the network's input encoding (a2u_jax.inputs)
Evaluation:
  items = folder_items(root) | alphamatting_items(root) | tfds_items(name, data_dir)
          | synthetic_items()
  eval_batches(items, batch_size=...)      full resolution, reflect-padded, shape buckets
"""

from a2u_jax.inputs import model_inputs
from data_pipeline.evaluation import (EvalItem, alphamatting_items, array_item,
                                      eval_batches, folder_items, num_buckets,
                                      synthetic_items, tfds_items)
from data_pipeline.sources import (ArraySource, FileSource, Source, SourceError,
                                   TfdsSource, adobe_source, d646_source,
                                   folder_source, synthetic_source, tfds_source)
from data_pipeline.training import split_for_devices, train_batches, train_dataset

_BUILDERS = {
    "synthetic": synthetic_source,
    "adobe": adobe_source,
    "d646": d646_source,
    "folder": folder_source,
    "tfds": tfds_source,
}


def build_source(name: str, **options) -> Source:
  """A training source by name: 'synthetic', 'adobe', 'd646', 'folder' or 'tfds'.

  Options are those of the matching `*_source` function (e.g. `root=`, `background_dir=`).
  """
  if name not in _BUILDERS:
    raise ValueError(f"unknown source {name!r}; expected one of {', '.join(_BUILDERS)}")
  return _BUILDERS[name](**options)


__all__ = ["ArraySource", "EvalItem", "FileSource", "Source", "SourceError", "TfdsSource",
           "alphamatting_items", "array_item", "build_source", "eval_batches",
           "folder_items", "model_inputs", "num_buckets", "split_for_devices",
           "synthetic_items", "tfds_items", "train_batches", "train_dataset"]
