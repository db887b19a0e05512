"""The matting loss of the authors' training script (docs/design.md §4).

loss = 0.5 * alpha loss + 0.5 * composition loss. Both are Charbonnier penalties
sqrt(d^2 + 1e-12) of the masked difference d = (prediction - target) * unknown, summed over
each image (and, for the composition, over its three colour channels), divided by the
image's unknown-pixel count + 1, and averaged over the batch. As in the authors' code the
penalty is taken after masking, so every known pixel adds the constant sqrt(1e-12) = 1e-6
(no gradient): the value is theirs to the last digit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPSILON = 1e-6
ALPHA_WEIGHT = 0.5


def _charbonnier(difference: jax.Array) -> jax.Array:
  return jnp.sqrt(difference * difference + EPSILON ** 2)


def matting_loss(prediction: jax.Array, alpha: jax.Array, trimap: jax.Array,
                 fg: jax.Array, bg: jax.Array, image: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Returns (loss, {"alpha_loss", "composition_loss"}), scalars.

  Args:
    prediction: raw network output (B, H, W, 1).
    alpha: ground truth (B, H, W, 1) in [0, 1].
    trimap: (B, H, W, 1), 128 marks the unknown region.
    fg, bg, image: (B, H, W, 3) in [0, 1]; image is the composite of fg and bg.
  """
  # At least float32 (a bfloat16 network's output), float64 for a float64 network.
  dtype = jnp.promote_types(prediction.dtype, jnp.float32)
  prediction = prediction.astype(dtype)
  unknown = (trimap == 128).astype(dtype)
  denominator = jnp.sum(unknown, axis=(1, 2, 3)) + 1.0
  alpha_loss = jnp.sum(_charbonnier((prediction - alpha) * unknown), axis=(1, 2, 3))
  composite = prediction * fg + (1.0 - prediction) * bg
  composition_loss = jnp.sum(_charbonnier((composite - image) * unknown), axis=(1, 2, 3))
  alpha_loss = jnp.mean(alpha_loss / denominator)
  composition_loss = jnp.mean(composition_loss / denominator)
  loss = ALPHA_WEIGHT * alpha_loss + (1.0 - ALPHA_WEIGHT) * composition_loss
  return loss, {"alpha_loss": alpha_loss, "composition_loss": composition_loss}
