"""The network's input encoding and output decoding, shared by training, evaluation and
prediction.

The authors feed the matting network four channels: the RGB composite normalised with the
ImageNet mean and standard deviation, and the trimap divided by 255 (so 0, ~0.502, 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def model_inputs(image, trimap) -> jnp.ndarray:
  """Encodes an image and its trimap as the matting network's 4-channel input.

  Args:
    image: RGB in [0, 1], float, shape (..., H, W, 3).
    trimap: values in {0, 128, 255} (uint8 or float), shape (..., H, W, 1).

  Returns:
    float32 array (..., H, W, 4): (image - mean) / std, then trimap / 255.
    Works on NumPy or JAX arrays and under jit.

  Raises:
    ValueError: an image that is not floating point (e.g. uint8 0..255: divide by 255),
      a trimap of another dtype, and, for concrete arrays (not under jit), image values
      outside [0, 1] or trimap values other than 0, 128 and 255 (e.g. a [0, 1] trimap:
      multiply by 255 and round).
  """
  image_dtype, trimap_dtype = np.dtype(image.dtype), np.dtype(trimap.dtype)
  if not np.issubdtype(image_dtype, np.floating):
    raise ValueError(f"image: expected floating-point RGB in [0, 1], got dtype {image_dtype}"
                     f"{' (0..255? divide by 255)' if np.issubdtype(image_dtype, np.integer) else ''}")
  if trimap_dtype != np.uint8 and not np.issubdtype(trimap_dtype, np.floating):
    raise ValueError(f"trimap: expected uint8 or floating point with values 0, 128 and 255, "
                     f"got dtype {trimap_dtype}")
  if not isinstance(image, jax.core.Tracer) and np.size(image):
    low, high = float(np.min(image)), float(np.max(image))
    if low < 0 or high > 1:
      raise ValueError(f"image: expected values in [0, 1], found {low:g}..{high:g}"
                       f"{' (0..255? divide by 255)' if high > 1 else ''}")
  if not isinstance(trimap, jax.core.Tracer) and np.size(trimap):
    values = np.unique(np.asarray(trimap))
    unexpected = np.setdiff1d(values, [0, 128, 255])
    if unexpected.size:
      hint = (" (a [0, 1] trimap? multiply by 255 and round to 0, 128 and 255)"
              if values.max() <= 1 else "")
      raise ValueError(f"trimap: expected values 0, 128 and 255, found "
                       f"{unexpected[:6].tolist()}{hint}")
  if image.shape[-1] != 3:
    raise ValueError(f"image: expected 3 (RGB) channels in the last axis, got shape "
                     f"{tuple(image.shape)}")
  if trimap.shape[-1] != 1 or trimap.shape[:-1] != image.shape[:-1]:
    raise ValueError(f"trimap: expected shape {tuple(image.shape[:-1]) + (1,)} to match the "
                     f"image, got {tuple(trimap.shape)}")
  mean = np.asarray(IMAGENET_MEAN, np.float32)
  std = np.asarray(IMAGENET_STD, np.float32)
  rgb = (jnp.asarray(image, jnp.float32) - mean) / std
  return jnp.concatenate([rgb, jnp.asarray(trimap, jnp.float32) / 255.0], axis=-1)


def postprocess_alpha(prediction, trimap) -> jnp.ndarray:
  """The authors' post-processing of a raw prediction: clipped to [0, 1], then 0 where the
  trimap is 0 and 1 where it is 255. Shapes (..., H, W, 1); NumPy or JAX, jit-able."""
  alpha = jnp.clip(jnp.asarray(prediction, jnp.float32), 0.0, 1.0)
  alpha = jnp.where(trimap == 0, 0.0, alpha)
  return jnp.where(trimap == 255, 1.0, alpha)


def quantize_alpha(alpha) -> np.ndarray:
  """A [0, 1] alpha as the authors save it: float32 alpha * 255, truncated to uint8 (their
  `astype(np.uint8)`); the published numbers are the MATLAB metrics of such PNGs."""
  alpha = np.clip(np.asarray(alpha, np.float32), 0.0, 1.0)
  return (alpha * np.float32(255)).astype(np.uint8)
