"""The Deep Image Matting training protocol, described once: its constants, its random
decisions and how they derive from (seed, example index).

Two modules execute it: `data_pipeline.composition` (TF graph ops, the reference, in the
tf.data pipeline) and `data_pipeline.jax_composition` (jitted JAX on the accelerator).
Both take the decisions drawn here, so given the same seed and example index they make the
same example. NumPy only: no TensorFlow, no JAX.

The stream of examples is global: example k belongs to epoch k // L (L = the source's epoch
length), its foreground is a per-epoch permutation of the positions modulo the number of
foregrounds, and every random choice of its composition comes from a Philox generator keyed
by (seed, k). Decisions whose range depends on the data (which unknown pixel the crop is
centred on, the uniform crop corner) are drawn as raw 32-bit integers and reduced modulo
their range by the executor (a bias below range / 2**32, i.e. < 0.1% for a 4 MP image).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

MERGE_PROBABILITY = 0.5
RESIZE_PROBABILITY = 0.25
RESIZE_TO = 640
SCALE_RANGE = (0.8, 1.25)
SHEAR_DEGREES = 10.0
ROTATION_DEGREES = 30.0
ROTATION_MIN_SIDE = 1024
AXIS_FLIP_PROBABILITY = 0.5
HFLIP_PROBABILITY = 0.5
MAX_KERNEL_SIZE = 29
MIN_UNKNOWN_FOR_CENTRED_CROP = 10
HUE_JITTER_DEGREES = 40
# OpenCV's nearest-neighbour warp works in fixed point with this many fractional bits.
WARP_BITS = 10
# An alpha at most this far from 0 or 1 is definite background or foreground.
DEFINITE_EPSILON = 1e-5

# The decisions, in the order of the generator's draws (append, never reorder: a new
# decision must not change the others).
UNIFORM_DRAWS = ("merge", "resize", "angle", "scale_x", "scale_y", "shear", "flip_x",
                 "flip_y", "hflip", "saturation_draw", "value_draw")
INTEGER_DRAWS = ("second_draw", "background_draw", "fg_kernel_draw", "bg_kernel_draw",
                 "hue_draw", "pick_draw", "top_draw", "left_draw")


class Decisions(NamedTuple):
  """Every random decision of one example (NumPy scalars).

  The three `*_draw` crop fields are raw uint32 draws: the executor takes them modulo the
  number of interior unknown pixels (`pick`) or of valid corners (`top`, `left`).
  """
  foreground_index: np.int64
  merge: np.bool_
  second_index: np.int64
  resize: np.bool_
  angle: np.float64  # degrees; applied only when the longer side >= ROTATION_MIN_SIDE
  scale_x: np.float64
  scale_y: np.float64
  shear: np.float64  # degrees
  flip_x: np.float64  # -1 or 1
  flip_y: np.float64
  hflip: np.bool_
  fg_kernel: np.int64  # 1..MAX_KERNEL_SIZE
  bg_kernel: np.int64
  background_index: np.int64
  pick_draw: np.uint32
  top_draw: np.uint32
  left_draw: np.uint32
  hue_degrees: np.int64  # in [-HUE_JITTER_DEGREES, HUE_JITTER_DEGREES)
  saturation_draw: np.float32  # uniform [0, 1)
  value_draw: np.float32


# The counter's last word tells apart the generators keyed by (seed, n): one per example
# for its decisions, one per epoch for its order.
_DECISIONS_STREAM, _ORDER_STREAM = 0, 1


def _generator(seed: int, n: int, stream: int) -> np.random.Generator:
  return np.random.Generator(np.random.Philox(
      key=[int(seed) % 2**64, int(n) % 2**64], counter=[0, 0, 0, stream]))


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, epoch_length: int) -> np.ndarray:
  return _generator(seed, epoch, _ORDER_STREAM).permutation(epoch_length)


def foreground_index(seed: int, index: int, epoch_length: int, num_foregrounds: int) -> int:
  """The foreground of global example `index`: every foreground equally often per epoch."""
  epoch, position = divmod(int(index), int(epoch_length))
  return int(_epoch_order(int(seed), epoch, int(epoch_length))[position]) % num_foregrounds


# The global stream has no end: its examples are counted up to this (past any run's).
STREAM_END = 2**62


def global_index(host_counter, batch_size: int, shard_index: int, num_shards: int):
  """The global example index of a process's `host_counter`-th example (an integer, or an
  integer tensor where the tf.data executor maps it over a dataset).

  Global batch b holds examples [b * B, (b + 1) * B) with B = batch_size * num_shards, and
  shard s takes its contiguous batch_size slice: a run is the same examples for any number
  of processes with the same global batch, and a stream's whole state is the number of
  batches it has given (resuming at batch b repeats and skips nothing).
  """
  batch_index, offset = host_counter // batch_size, host_counter % batch_size
  return (batch_index * num_shards + shard_index) * batch_size + offset


def draw(seed: int, index: int, *, num_foregrounds: int, num_backgrounds: int,
         epoch_length: int) -> Decisions:
  """The random decisions of global example `index` of the stream seeded by `seed`."""
  generator = _generator(seed, index, _DECISIONS_STREAM)
  u = dict(zip(UNIFORM_DRAWS, generator.random(len(UNIFORM_DRAWS))))
  r = dict(zip(INTEGER_DRAWS, generator.integers(0, 2**32, len(INTEGER_DRAWS),
                                                 dtype=np.uint64)))

  def between(name, low, high):
    return np.float64(low + (high - low) * u[name])

  def below(name, count):
    return np.int64(r[name] % np.uint64(count))

  return Decisions(
      foreground_index=np.int64(foreground_index(seed, index, epoch_length,
                                                 num_foregrounds)),
      merge=np.bool_(u["merge"] < MERGE_PROBABILITY),
      second_index=below("second_draw", num_foregrounds),
      resize=np.bool_(u["resize"] < RESIZE_PROBABILITY),
      angle=between("angle", -ROTATION_DEGREES, ROTATION_DEGREES),
      scale_x=between("scale_x", *SCALE_RANGE),
      scale_y=between("scale_y", *SCALE_RANGE),
      shear=between("shear", -SHEAR_DEGREES, SHEAR_DEGREES),
      flip_x=np.float64(-1.0 if u["flip_x"] < AXIS_FLIP_PROBABILITY else 1.0),
      flip_y=np.float64(-1.0 if u["flip_y"] < AXIS_FLIP_PROBABILITY else 1.0),
      hflip=np.bool_(u["hflip"] < HFLIP_PROBABILITY),
      fg_kernel=1 + below("fg_kernel_draw", MAX_KERNEL_SIZE),
      bg_kernel=1 + below("bg_kernel_draw", MAX_KERNEL_SIZE),
      background_index=below("background_draw", num_backgrounds),
      pick_draw=np.uint32(r["pick_draw"]),
      top_draw=np.uint32(r["top_draw"]),
      left_draw=np.uint32(r["left_draw"]),
      hue_degrees=below("hue_draw", 2 * HUE_JITTER_DEGREES) - HUE_JITTER_DEGREES,
      saturation_draw=np.float32(u["saturation_draw"]),
      value_draw=np.float32(u["value_draw"]))


def rotates(height: int, width: int) -> bool:
  """Whether the affine's rotation applies to a (height, width) foreground."""
  return max(height, width) >= ROTATION_MIN_SIDE


def inverse_affine_linear(decisions: Decisions, rotate: bool) -> tuple[float, ...]:
  """(m0, m1, m3, m4): the linear part of the authors' inverse affine (output -> source).

  Order flip -> scale -> rotation -> shear, in double precision as their Python code does.
  Computed here once (libm's cos and sin) so both executors use the same bits; each adds
  the translation `m0 * -cx + m1 * -cy + cx` (resp. m3, m4, cy) for its centre.
  """
  angle = math.radians(float(decisions.angle)) if rotate else 0.0
  shear = math.radians(float(decisions.shear))
  sx = float(decisions.flip_x) / float(decisions.scale_x)
  sy = float(decisions.flip_y) / float(decisions.scale_y)
  d = math.cos(angle + shear) * math.cos(angle) + math.sin(angle + shear) * math.sin(angle)
  return (math.cos(angle) * sx / d, math.sin(angle + shear) * sx / d,
          -math.sin(angle) * sy / d, math.cos(angle + shear) * sy / d)


# The decisions as flat vectors (for tf.numpy_function): FLOAT_FIELDS, then the affine's
# linear part without and with the rotation (whether it applies depends on a size that
# only the executor knows); INT_FIELDS.
FLOAT_FIELDS = ("angle", "scale_x", "scale_y", "shear", "flip_x", "flip_y",
                "saturation_draw", "value_draw")
INT_FIELDS = tuple(f for f in Decisions._fields if f not in FLOAT_FIELDS)


def as_vectors(decisions: Decisions) -> tuple[np.ndarray, np.ndarray]:
  """(float64 (len(FLOAT_FIELDS) + 8,), int64 (len(INT_FIELDS),))."""
  values = decisions._asdict()
  floats = [values[f] for f in FLOAT_FIELDS]
  floats += inverse_affine_linear(decisions, False) + inverse_affine_linear(decisions, True)
  return (np.array(floats, np.float64), np.array([values[f] for f in INT_FIELDS], np.int64))


def draw_vectors(seed: int, index: int, num_foregrounds: int, num_backgrounds: int,
                 epoch_length: int) -> tuple[np.ndarray, np.ndarray]:
  """`as_vectors(draw(...))`, positional (the form tf.numpy_function calls)."""
  return as_vectors(draw(int(seed), int(index), num_foregrounds=int(num_foregrounds),
                         num_backgrounds=int(num_backgrounds),
                         epoch_length=int(epoch_length)))
