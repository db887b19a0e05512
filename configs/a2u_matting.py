"""The authors' recipe (docs/design.md §4): A2U matting network (share), Composition-1k training.

  python train.py --config configs/a2u_matting.py --workdir runs/a2u \
      --config.data.options.root=/data/Combined_Dataset \
      --config.data.options.background_dir=/data/coco/train2014 \
      --config.init.torchvision_resnet34=/weights/resnet34-b627a593.pth
"""

import ml_collections
from ml_collections import config_dict

from a2u_jax import resamplers

MODEL_SET = ("dtype", "axis_name")  # given by the model, not by the config


def use_resampler(config: ml_collections.ConfigDict, name: str) -> None:
  """Sets config.model.resampler to `name` ("baseline" or an operator of
  `a2u_jax.resamplers`) and config.model.resampler_options to every option of that
  operator with its default, so each can be overridden from the command line
  (--config.model.resampler_options.share=False)."""
  options = resamplers.make_resampler("bilinear" if name == "baseline" else name).options
  config.model.resampler = name
  config.model.resampler_options = ml_collections.ConfigDict({
      key: config_dict.placeholder(str) if value is None else value
      for key, value in options.items() if key not in MODEL_SET})


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict()
  use_resampler(config, "a2u")
  config.model.dropout_rate = 0.5
  # or "bfloat16"; "float64" with JAX_ENABLE_X64=1 (compute only; parameters stay float32)
  config.dtype = "float32"
  config.seed = 0

  # Optimisation: Adam, lr 0.01 (new parts) and 0.01 / 100 (ImageNet encoder), x0.1 after
  # epochs 20 and 26 of 30, 6000 iterations per epoch, batch 16 (global), 512 crops.
  config.batch_size = 16
  config.crop_size = 512
  config.learning_rate = 0.01
  config.encoder_lr_divisor = 100.0
  config.num_epochs = 30
  config.steps_per_epoch = 6000
  config.decay_epochs = (20, 26)
  config.decay_factor = 0.1
  config.num_train_steps = -1  # -1: num_epochs * steps_per_epoch

  config.data = ml_collections.ConfigDict()
  # The sources are declared in data_pipeline/catalog.py, with their options:
  config.data.source = "adobe"  # synthetic | adobe | d646 | folder | tfds
  # Two executors of one protocol (data_pipeline/protocol.py), for every source: tf, the
  # tf.data pipeline, the reference (needs the `train` extra); jax, composited on the
  # accelerator (data_pipeline/jax_pipeline.py; no TensorFlow). A seed gives both executors
  # the same alphas and trimaps.
  config.data.pipeline = "tf"
  config.data.options = ml_collections.ConfigDict(dict(
      root=config_dict.placeholder(str), background_dir=config_dict.placeholder(str),
      backgrounds_per_foreground=100))

  config.init = ml_collections.ConfigDict()
  config.init.torchvision_resnet34 = ""  # a .pth / .npz of torchvision's resnet34 weights

  # Validation, which chooses best_model/ (docs/design.md §5). The authors validate on the
  # 1000 Composition-1k test images after every epoch (their trainval.py: train() runs
  # the epoch's 6000 iterations, then validate(); an epoch is 6000 batches of 16, not one
  # pass over the source's 43,100 composites) and keep the lowest SAD by their own rule
  # (sad_rule "authors", a2u_jax/sad_rules.py). To do the same, give the test set:
  #   --config.validation.source=composition1k --config.validation.data_dir=DIR
  # with DIR a TFDS data_dir where data_pipeline.tfds_builders.prepare("composition1k",
  # ...) wrote it, or a folder with image/, trimap/ and alpha/. Without it, 8 held-out
  # synthetic composites stand in: a smoke check, not the paper's model selection.
  # The other sources: alphamatting | folder | tfds, with `options` as data_pipeline's
  # alphamatting_items / folder_items / tfds_items take (synthetic: synthetic_items').
  config.validation = ml_collections.ConfigDict()
  config.validation.source = "synthetic"
  config.validation.data_dir = ""  # composition1k: its TFDS data_dir or folder
  config.validation.options = ml_collections.ConfigDict(dict(count=8))
  # "authors": their validation SAD (float alpha, OpenCV min-max stretch); "matlab": the
  # published SAD of the saved 8-bit alpha, a2u-evaluate's number.
  config.validation.sad_rule = "authors"
  config.validation.batch_size = 1  # per host; rounded up to a multiple of the devices
  config.eval_every = -1  # steps between validations; -1: every epoch (steps_per_epoch)

  config.log_every = 50
  config.image_summary_every = 1000
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  # Multi-host runs where JAX detects the cluster (SLURM, Open MPI, TPU pods, Kubernetes);
  # train.py's --coordinator_address/--num_processes/--process_id for an explicit one.
  config.distributed = False
  config.compilation_cache_dir = ""  # persistent XLA cache (speeds up restarts)
  return config
