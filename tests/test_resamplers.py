"""The resampler family: every registered operator through one interface, and each one
against an independent formulation of its published definition."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2u_jax import layers, ops, resamplers
from a2u_jax import resample_ops as rops


@pytest.fixture(autouse=True)
def _float32_matmuls():
  """GPUs and TPUs run float32 matmuls and convolutions in reduced precision by default
  (TF32, bf16 passes); the comparisons with NumPy loops here are at float32 accuracy."""
  with jax.default_matmul_precision("highest"):
    yield


class PairNet(nn.Module):
  """Down (the operator's, or a stride-2 conv) then up, guided by the input."""

  resampler: str

  @nn.compact
  def __call__(self, x, train: bool = False):
    family = resamplers.make_resampler(self.resampler)
    down = family.down(name="down")
    if down is None:
      y, context = nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), name="conv_down")(x), None
    else:
      y, context = down(x, train)
    return family.up(name="up")(y, context, x)


@pytest.mark.parametrize("name", resamplers.RESAMPLERS)
def test_every_operator_round_trips_with_finite_gradients_under_jit_and_vmap(name):
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, 32))
  net = PairNet(name)
  variables = jax.jit(net.init)(jax.random.key(1), x)
  apply = jax.jit(net.apply)
  out = apply(variables, x)
  chex.assert_shape(out, x.shape)
  chex.assert_tree_all_finite(out)
  np.testing.assert_array_equal(out, apply(variables, x))  # deterministic
  assert float(jnp.abs(apply(variables, 2 * x) - out).max()) > 1e-3  # depends on the input

  params = variables.get("params", {})
  rest = {k: v for k, v in variables.items() if k != "params"}

  def loss(params, x):
    return jnp.sum(net.apply({"params": params, **rest}, x) ** 2)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  chex.assert_tree_all_finite(grads)
  assert float(jnp.abs(grads[1]).max()) > 0
  # vmap over an extra leading axis gives the per-slice results.
  stacked = jnp.stack([x, -x])
  mapped = jax.jit(jax.vmap(net.apply, in_axes=(None, 0)))(variables, stacked)
  np.testing.assert_allclose(mapped[1], apply(variables, -x), rtol=1e-5, atol=1e-5)


def test_registry_lists_the_issue_operators_and_rejects_bad_names_and_options():
  assert set(resamplers.RESAMPLERS) == {
      "nearest", "bilinear", "deconv", "pixel_shuffle", "max_unpool", "carafe", "indexnet",
      "a2u", "fade", "sapa", "dysample"}
  paired = {n for n in resamplers.RESAMPLERS if resamplers.make_resampler(n).paired}
  assert paired == {"pixel_shuffle", "max_unpool", "indexnet", "a2u"}
  with pytest.raises(ValueError, match="unknown resampler 'bicubic'"):
    resamplers.make_resampler("bicubic")
  with pytest.raises(ValueError, match="carafe: unknown option\\(s\\) kernel"):
    resamplers.make_resampler("carafe", kernel=3)
  assert resamplers.make_resampler("a2u", share=False).options["share"] is False


@pytest.mark.parametrize("name,message", [("fade", "needs `guide`"), ("sapa", "needs `guide`"),
                                          ("max_unpool", "needs the indices"),
                                          ("indexnet", "needs the index map"),
                                          ("a2u", "needs the up kernels")])
def test_missing_guide_or_context_is_a_clear_error(name, message):
  up = resamplers.make_resampler(name).up()
  with pytest.raises(ValueError, match=message):
    up.init(jax.random.key(0), jnp.ones((1, 4, 4, 32)))


def _softmax(v, axis=-1):
  e = np.exp(v - v.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _conv_same(x, kernel, bias):
  """NumPy 'SAME' correlation, NHWC x HWIO, odd kernel."""
  k = kernel.shape[0]
  p = k // 2
  padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for dy in range(k):
    for dx in range(k):
      out += padded[:, dy:dy + x.shape[1], dx:dx + x.shape[2]] @ kernel[dy, dx]
  return out + bias


def _reassemble_loop(x, kernel_at, k):
  """out[Y, X] = sum_t kernel_at(Y, X)[t] * x[Y//2 + ky - r, X//2 + kx - r] (zero outside)."""
  n, h, w, c = x.shape
  r = k // 2
  out = np.zeros((n, 2 * h, 2 * w, c))
  for yy in range(2 * h):
    for xx in range(2 * w):
      weights = kernel_at(yy, xx)  # (N, K*K)
      for t in range(k * k):
        sy, sx = yy // 2 + t // k - r, xx // 2 + t % k - r
        if 0 <= sy < h and 0 <= sx < w:
          out[:, yy, xx] += weights[:, t, None] * x[:, sy, sx]
  return out


def test_carafe_matches_a_loop_of_its_definition():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 5, 6, 8)).astype(np.float32)
  up = resamplers.CARAFEUp(compressed_channels=4)
  params = up.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda p: p + rng.normal(size=p.shape).astype(np.float32) * 0.3,
                        params)
  ours = up.apply({"params": params}, x)
  p = jax.tree.map(np.asarray, params)
  compressed = x @ p["compressor"]["kernel"][0, 0] + p["compressor"]["bias"]
  logits = _conv_same(compressed, p["content_encoder"]["kernel"], p["content_encoder"]["bias"])

  def kernel_at(yy, xx):  # pixel shuffle: channel t*4 + (Y%2)*2 + X%2 at (Y//2, X//2)
    sub = (yy % 2) * 2 + xx % 2
    return _softmax(logits[:, yy // 2, xx // 2, sub::4])

  np.testing.assert_allclose(ours, _reassemble_loop(x, kernel_at, 5), rtol=1e-4, atol=1e-5)


def test_sapa_matches_a_loop_with_zero_logits_outside_the_map():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 3, 4, 6)).astype(np.float32)
  guide = rng.normal(size=(1, 6, 8, 5)).astype(np.float32)
  up = resamplers.SAPAUp(embedding_dim=7)
  params = up.init(jax.random.key(0), x, None, guide)["params"]
  params = jax.tree.map(lambda p: p + rng.normal(size=p.shape).astype(np.float32) * 0.3,
                        params)
  ours = up.apply({"params": params}, x, None, guide)
  p = jax.tree.map(np.asarray, params)

  def layer_norm(v, scale, bias):
    mean = v.mean(-1, keepdims=True)
    return (v - mean) / np.sqrt(((v - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * scale + bias

  q = layer_norm(guide, p["norm_guide"]["scale"], p["norm_guide"]["bias"]) @ \
      p["query"]["kernel"] + p["query"]["bias"]
  key = layer_norm(x, p["norm_x"]["scale"], p["norm_x"]["bias"]) @ p["key"]["kernel"] + \
      p["key"]["bias"]
  h, w, k, r = 3, 4, 5, 2

  def kernel_at(yy, xx):
    logits = np.zeros((1, k * k))
    for t in range(k * k):
      sy, sx = yy // 2 + t // k - r, xx // 2 + t % k - r
      if 0 <= sy < h and 0 <= sx < w:
        logits[:, t] = q[:, yy, xx] @ key[0, sy, sx]
    return _softmax(logits)

  np.testing.assert_allclose(ours, _reassemble_loop(x, kernel_at, k), rtol=1e-4, atol=1e-5)


def _bilinear_border_loop(image, ix, iy):
  h, w = image.shape[:2]
  ix, iy = min(max(ix, 0), w - 1), min(max(iy, 0), h - 1)
  x0, y0 = int(np.floor(ix)), int(np.floor(iy))
  x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
  ax, ay = ix - x0, iy - y0
  return ((image[y0, x0] * (1 - ax) + image[y0, x1] * ax) * (1 - ay)
          + (image[y1, x0] * (1 - ax) + image[y1, x1] * ax) * ay)


@pytest.mark.parametrize("style", ["lp", "pl"])
def test_dysample_matches_grid_sample_with_border_padding(style):
  rng = np.random.default_rng(2)
  groups = 2
  x = rng.normal(size=(1, 4, 5, 8)).astype(np.float32)
  up = resamplers.DySampleUp(groups=groups, style=style)
  params = up.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 2, params)
  ours = np.asarray(up.apply({"params": params}, x))
  kernel, bias = np.asarray(params["offset"]["kernel"][0, 0]), np.asarray(params["offset"]["bias"])
  if style == "lp":
    raw = x @ kernel + bias  # (1, h, w, 2*G*4): channel (xy*G + g)*4 + sub

    def offset(yy, xx, xy, g):
      return raw[0, yy // 2, xx // 2, (xy * groups + g) * 4 + (yy % 2) * 2 + xx % 2]
  else:
    raw = np.asarray(ops.pixel_shuffle(jnp.asarray(x), 2)) @ kernel + bias  # (1,2h,2w,2G)

    def offset(yy, xx, xy, g):
      return raw[0, yy, xx, xy * groups + g]

  expected = np.zeros_like(ours)
  per_group = x.shape[-1] // groups
  for yy in range(8):
    for xx in range(10):
      for g in range(groups):
        ix = xx // 2 + 0.25 * offset(yy, xx, 0, g) + (0.25 if xx % 2 else -0.25)
        iy = yy // 2 + 0.25 * offset(yy, xx, 1, g) + (0.25 if yy % 2 else -0.25)
        channels = slice(g * per_group, (g + 1) * per_group)
        expected[0, yy, xx, channels] = _bilinear_border_loop(x[0, :, :, channels], ix, iy)
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_dysample_with_zero_offsets_is_bilinear_upsampling():
  x = jax.random.normal(jax.random.key(3), (2, 5, 7, 8))
  up = resamplers.DySampleUp(groups=4)
  params = jax.tree.map(jnp.zeros_like, up.init(jax.random.key(0), x)["params"])
  np.testing.assert_allclose(up.apply({"params": params}, x), rops.bilinear_up(x), atol=1e-5)


def test_bilinear_up_is_half_pixel_with_clamped_borders():
  row = np.array([[0.0, 4.0, 8.0]], np.float32)[None, ..., None]  # (1, 1, 3, 1)
  out = np.asarray(rops.bilinear_up(jnp.asarray(row)))[0, 0, :, 0]
  # Output x samples input position (x + 0.5) / 2 - 0.5, clamped: -0.25 -> 0, 0.25, 0.75...
  np.testing.assert_allclose(out, [0, 1, 3, 5, 7, 8])
  np.testing.assert_array_equal(rops.nearest_up(jnp.asarray(row))[0, 1, :, 0],
                                [0, 0, 4, 4, 8, 8])


def test_max_pool_indices_and_unpool_by_hand():
  window = jnp.array([[1.0, 3.0], [3.0, 0.0]])[None, :, :, None]
  pooled, indices = rops.max_pool_with_indices(window)
  assert float(pooled[0, 0, 0, 0]) == 3.0 and int(indices[0, 0, 0, 0]) == 1  # first tie
  restored = rops.max_unpool(jnp.full((1, 1, 1, 1), 5.0), indices)
  np.testing.assert_array_equal(restored[0, :, :, 0], [[0, 5], [0, 0]])
  x = jax.random.normal(jax.random.key(4), (2, 6, 8, 3))
  pooled, indices = rops.max_pool_with_indices(x)
  np.testing.assert_array_equal(
      pooled, jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"))
  unpooled = rops.max_unpool(pooled, indices)
  np.testing.assert_array_equal(unpooled, jnp.where(unpooled != 0, x, 0))
  assert int(jnp.sum(unpooled != 0)) == pooled.size


def test_space_to_depth_inverts_pixel_shuffle():
  x = jax.random.normal(jax.random.key(5), (2, 6, 4, 3))
  np.testing.assert_array_equal(ops.pixel_shuffle(rops.space_to_depth(x), 2), x)
  np.testing.assert_array_equal(rops.space_to_depth(x)[0, 0, 0, 1], x[0, 0, 1, 0])  # c0, (0,1)


def test_indexnet_with_zero_index_weights_is_average_pooling_and_half_nearest():
  x = jax.random.normal(jax.random.key(6), (1, 4, 6, 8))
  for index in ("holistic", "depthwise_o2o", "depthwise_m2o"):
    down = resamplers.IndexNetDown(index=index, nonlinear=False, context=False)
    params = jax.tree.map(jnp.zeros_like, down.init(jax.random.key(0), x)["params"])
    pooled, decoder_index = down.apply({"params": params}, x)
    mean = x.reshape(1, 2, 2, 3, 2, 8).mean(axis=(2, 4))
    np.testing.assert_allclose(pooled, mean, atol=1e-6)
    np.testing.assert_allclose(resamplers.IndexNetUp().apply({}, pooled, decoder_index),
                               0.5 * rops.nearest_up(pooled), atol=1e-6)


def test_indexnet_index_positions_follow_pixel_shuffle_order():
  # A holistic index conv that only looks at the window's bottom-right pixel for position 3:
  # where that pixel is large, the encoder index puts (almost) all weight on position 3.
  x = jnp.zeros((1, 2, 2, 1)).at[0, 1, 1, 0].set(50.0)
  down = resamplers.IndexNetDown(index="holistic", nonlinear=False, context=False)
  kernel = jnp.zeros((2, 2, 1, 4)).at[1, 1, 0, 3].set(1.0)
  pooled, decoder_index = down.apply({"params": {"index_conv": {"kernel": kernel}}}, x)
  assert float(decoder_index[0, 1, 1, 0]) == pytest.approx(1.0)
  assert float(decoder_index[0, 0, 0, 0]) == pytest.approx(0.5)
  # softmax(sigmoid) is soft: position 3 gets e^1 / (e^1 + 3 e^0.5) of the window.
  assert float(pooled[0, 0, 0, 0]) == pytest.approx(50 * np.e / (np.e + 3 * np.exp(0.5)),
                                                    rel=1e-5)


@pytest.mark.parametrize("lite", [False, True])
def test_fade_gate_extremes_and_uniform_kernels(lite):
  rng = np.random.default_rng(7)
  x = rng.normal(size=(1, 4, 5, 6)).astype(np.float32)
  guide = rng.normal(size=(1, 8, 10, 3)).astype(np.float32)  # other width: aligned by 1x1
  up = resamplers.FADEUp(lite=lite)
  params = up.init(jax.random.key(0), x, None, guide)["params"]
  flat = dict(params)
  # Gate fully open: the output is the aligned guide.
  open_gate = {**flat, "gate": {**flat["gate"], "bias": jnp.full((1,), 50.0)}}
  aligned = guide @ np.asarray(flat["align"]["kernel"][0, 0]) + np.asarray(flat["align"]["bias"])
  np.testing.assert_allclose(up.apply({"params": open_gate}, x, None, guide), aligned,
                             rtol=1e-5, atol=1e-5)
  # Gate closed and a zero content encoder: uniform 5x5 kernels, a zero-padded box filter.
  closed = {**open_gate, "gate": {**flat["gate"], "bias": jnp.full((1,), -50.0)},
            "content_encoder": jax.tree.map(jnp.zeros_like, flat["content_encoder"])}
  ours = up.apply({"params": closed}, x, None, guide)
  expected = _reassemble_loop(x, lambda yy, xx: np.full((1, 25), 1 / 25), 5)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_a2u_pair_is_the_a2u_layers_with_the_chosen_options():
  family = resamplers.make_resampler("a2u", share=False, rank=2, up_kernel_size=5,
                                     implementation="gather")
  down, up = family.down(name="down0"), family.up()
  assert isinstance(down, layers.A2UDownsample) and isinstance(up, layers.A2UUpsample)
  assert (down.share, down.rank, down.up_kernel_size, down.implementation) == (
      False, 2, 5, "gather")
  assert (up.up_kernel_size, up.implementation) == (5, "gather")
  x = jax.random.normal(jax.random.key(8), (1, 8, 8, 32))
  variables = jax.jit(down.init)(jax.random.key(0), x)
  y, kernels = jax.jit(down.apply)(variables, x, True)  # `train` changes nothing in A2U
  np.testing.assert_array_equal(y, jax.jit(down.apply)(variables, x)[0])
  chex.assert_shape(up.apply({}, y, kernels, None), x.shape)
  with pytest.raises(ValueError, match="a2u: `implementation` must be one of None, 'slices'"):
    resamplers.make_resampler("a2u", implementation="loops")
