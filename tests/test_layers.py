"""Kernel generator and A2U layers: the authors' kernels, shapes, normalisation, layout."""

import chex
import jax.test_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2u_jax import layers, ops


def _official_generator_params(state_dict, prefix):
  """Hand mapping of one official `InterChannelUpDown` (the converter comes later)."""
  get = lambda key: np.asarray(state_dict[f"state_dict/module.{prefix}.{key}"])
  dense = lambda key: {"kernel": get(f"{key}.weight")[:, :, 0, 0].T, "bias": get(f"{key}.bias")}
  norm = lambda key: {"scale": get(f"{key}.weight"), "bias": get(f"{key}.bias")}
  return {"encode_u": dense("bconv_U.1"), "encode_v": dense("bconv_V.1"),
          "mix_up": dense("bconv_UP.1"), "mix_down": dense("bconv_DP.1"),
          "norm_u": norm("bnu.0"), "norm_v": norm("bnv.0")}


def test_generator_reproduces_authors_kernels(matting_reference):
  x = np.transpose(matting_reference["intermediate/layer0"], (0, 2, 3, 1))
  params = _official_generator_params(matting_reference, "bilinear0")
  generator = layers.A2UKernelGenerator()
  chex.assert_trees_all_equal_shapes(params, generator.init(jax.random.key(0), x)["params"])
  down, up = jax.jit(generator.apply)({"params": params}, x)
  expected_down = np.transpose(matting_reference["intermediate/bilinear0_down_kernels"],
                               (0, 2, 3, 1))
  expected_up = np.transpose(matting_reference["intermediate/bilinear0_up_kernels"],
                             (0, 2, 3, 1))
  np.testing.assert_allclose(down, expected_down, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(up, expected_up, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size,bins", [(96, 6), (128, 6), (7, 3), (5, 5), (3, 6)])
def test_adaptive_pool_matrix_follows_pytorch_bins(size, bins):
  matrix = ops.adaptive_avg_pool_matrix(size, bins)
  for i in range(bins):
    start = int(np.floor(i * size / bins))
    stop = int(np.ceil((i + 1) * size / bins))
    expected = np.zeros(size)
    expected[start:stop] = 1 / (stop - start)
    np.testing.assert_allclose(matrix[i], expected, rtol=1e-7)


def test_pixel_shuffle_uses_pytorch_channel_order():
  x = np.arange(2 * 3 * 4 * 8, dtype=np.float32).reshape(2, 3, 4, 8)   # C = 2 * 2 * 2
  out = np.asarray(ops.pixel_shuffle(jnp.asarray(x), 2))
  chex.assert_shape(out, (2, 6, 8, 2))
  for c in range(2):
    for i in range(2):
      for j in range(2):
        np.testing.assert_array_equal(out[:, i::2, j::2, c], x[..., c * 4 + i * 2 + j])


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("up_kernel_size,rank,groups", [(3, 1, 1), (3, 2, 2), (1, 3, 1),
                                                         (5, 1, 4)])
def test_generator_shapes_and_normalisation(up_kernel_size, rank, groups, share):
  x = jax.random.normal(jax.random.key(1), (2, 10, 14, 32))
  generator = layers.A2UKernelGenerator(up_kernel_size=up_kernel_size, rank=rank,
                                        groups=groups, share=share)
  variables = generator.init(jax.random.key(2), x)
  down, up = generator.apply(variables, x)
  s = up_kernel_size
  chex.assert_shape(down, (2, 5, 7, groups * (2 * s)**2))
  chex.assert_shape(up, (2, 10, 14, groups * s * s))
  np.testing.assert_allclose(down.reshape(2, 5, 7, groups, -1).sum(-1), 1.0, rtol=1e-5)
  if s > 1:
    np.testing.assert_allclose(up.reshape(2, 10, 14, groups, -1).sum(-1), 1.0, rtol=1e-5)
  else:
    assert bool(jnp.all((up > 0) & (up < 1)))
  banks = rank * (1 if share else 32)
  chex.assert_shape(variables["params"]["encode_u"]["kernel"], (32, banks))
  chex.assert_shape(variables["params"]["mix_up"]["kernel"], (32, (2 * s)**2 * groups * rank))


def test_group_layout_agrees_between_generator_and_reassembly():
  """Kernel group g must act on channel block g only (group-major layout end to end)."""
  groups, c = 2, 64
  x = jax.random.normal(jax.random.key(3), (1, 8, 8, c))
  down_layer = layers.A2UDownsample(groups=groups)
  variables = down_layer.init(jax.random.key(4), x)
  y, up_kernels = down_layer.apply(variables, x)
  down_kernels, _ = layers.A2UKernelGenerator(groups=groups).apply(
      {"params": variables["params"]["generator"]}, x)
  # Perturb only the second group's down kernels: the first channel block is unchanged.
  perturbed = down_kernels.at[..., 36:].multiply(2.0)
  y2 = ops.reassemble_down(x, perturbed, kernel_size=6, groups=groups)
  np.testing.assert_allclose(y2[..., :c // 2], y[..., :c // 2], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y2[..., c // 2:], 2 * y[..., c // 2:], rtol=1e-5, atol=1e-5)
  # Normalised per group, so reassembling a constant map reproduces it away from borders.
  up = layers.A2UUpsample(groups=groups).apply({}, jnp.ones((1, 4, 4, c)), up_kernels)
  np.testing.assert_allclose(up[:, 2:6, 2:6], 1.0, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_down_up_layers_round_trip_shapes_and_dtypes(dtype):
  x = jax.random.normal(jax.random.key(5), (2, 16, 12, 32)).astype(dtype)
  down_layer = layers.A2UDownsample()
  variables = jax.jit(down_layer.init)(jax.random.key(6), x)
  y, up_kernels = jax.jit(down_layer.apply)(variables, x)
  chex.assert_shape(y, (2, 8, 6, 32))
  chex.assert_shape(up_kernels, (2, 16, 12, 9))
  assert y.dtype == dtype
  z = layers.A2UUpsample().apply({}, y, up_kernels)
  chex.assert_shape(z, x.shape)
  assert z.dtype == dtype
  chex.assert_tree_all_finite(z)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(layers.A2UUpsample().apply(
      {}, down_layer.apply({"params": p}, x)[0], up_kernels).astype(jnp.float32))))(
          variables["params"])
  chex.assert_tree_all_finite(grads)
  assert float(jnp.abs(grads["generator"]["mix_down"]["kernel"]).sum()) > 0


@pytest.mark.parametrize("shape,kwargs,message", [
    ((2, 8, 8), {}, "rank 4"),
    ((2, 7, 8, 32), {}, "even"),
    ((2, 8, 8, 24), {}, "divisible by norm_groups"),
    ((2, 8, 8, 32), {"up_kernel_size": 2}, "odd"),
    ((2, 8, 8, 32), {"rank": 0}, "rank"),
])
def test_generator_rejects_bad_input(shape, kwargs, message):
  with pytest.raises(ValueError, match=message):
    layers.A2UKernelGenerator(**kwargs).init(jax.random.key(0), jnp.zeros(shape))


def _depthwise_by_conv(x, kernels, stride, padding):
  """Independent formulation: a vmapped grouped convolution, one kernel bank per sample."""
  n, k, _, c, mult = kernels.shape

  def one(xi, ki):
    return jax.lax.conv_general_dilated(
        xi[None], ki.reshape(k, k, 1, c * mult), (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST)[0]

  out = jax.vmap(one)(x, kernels)
  return out.reshape(out.shape[:3] + (c, mult))


def test_per_sample_depthwise_matches_grouped_convolution_and_its_gradient():
  x = jax.random.normal(jax.random.key(7), (2, 10, 12, 3))
  kernels = jax.random.normal(jax.random.key(8), (2, 6, 6, 3, 2))
  expected = _depthwise_by_conv(x, kernels, 2, 2)
  out = jax.jit(ops.per_sample_depthwise, static_argnums=(2, 3))(x, kernels, 2, 2)
  chex.assert_shape(out, (2, 5, 6, 3, 2))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  # Per-sample kernels really are per sample.
  np.testing.assert_allclose(out[1], _depthwise_by_conv(x[1:], kernels[1:], 2, 2)[0],
                             rtol=1e-5, atol=1e-5)
  with jax.enable_x64(True):
    x64, k64 = np.asarray(x, np.float64), np.asarray(kernels, np.float64)
    jax.test_util.check_grads(lambda a, b: ops.per_sample_depthwise(a, b, 2, 2),
                              (x64, k64), order=1, modes=("rev",))
    # The hand-written VJP against the grouped convolution's autodiff, odd sizes included.
    x_odd = np.random.default_rng(0).standard_normal((2, 9, 11, 3))
    ct = np.random.default_rng(1).standard_normal((2, 4, 5, 3, 2))
    got = jax.vjp(lambda a, b: ops.per_sample_depthwise(a, b, 2, 2), x_odd, k64)[1](ct)
    want = jax.vjp(lambda a, b: _depthwise_by_conv(a, b, 2, 2), x_odd, k64)[1](ct)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)
    # Banks shared by all channels ((N, k, k, 1, M)) are the per-channel banks broadcast,
    # and their gradient is the per-channel gradient summed over channels; stride 3 and
    # odd sizes exercise the phase split.
    shared = np.random.default_rng(2).standard_normal((2, 5, 5, 1, 2))
    broadcast = np.broadcast_to(shared, (2, 5, 5, 3, 2))
    ct3 = np.random.default_rng(3).standard_normal((2, 3, 4, 3, 2))
    got = jax.vjp(lambda a, b: ops.per_sample_depthwise(a, b, 3, 2), x_odd, shared)
    want = jax.vjp(lambda a, b: _depthwise_by_conv(a, b, 3, 2), x_odd, broadcast)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    got, want = got[1](ct3), want[1](ct3)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got[1], want[1].sum(axis=3, keepdims=True), rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("band_rows", [None, 2])
@pytest.mark.parametrize("stride,padding,kernel_size", [(2, 2, 6), (3, 2, 5)])
def test_shared_bank_gradient_in_row_bands(monkeypatch, band_rows, stride, padding,
                                           kernel_size):
  """The shared banks' gradient on both schedules of `ops._in_row_bands`: all rows at
  once (accelerators) and bands of two output rows (the CPU's, ragged here)."""
  x = np.random.default_rng(4).standard_normal((2, 13, 11, 3))
  shared = np.random.default_rng(5).standard_normal((2, kernel_size, kernel_size, 1, 2))
  out_h = (13 + 2 * padding - kernel_size) // stride + 1
  out_w = (11 + 2 * padding - kernel_size) // stride + 1
  ct = np.random.default_rng(6).standard_normal((2, out_h, out_w, 3, 2))
  if band_rows is None:
    monkeypatch.setattr(ops, "BANDED_PLATFORMS", ())
  else:
    monkeypatch.setattr(ops, "BAND_BYTES", band_rows * out_w * 3 * 2 * 8)
  with jax.enable_x64(True):
    got = jax.vjp(lambda a, b: ops.per_sample_depthwise(a, b, stride, padding), x,
                  shared)[1](ct)
    broadcast = np.broadcast_to(shared, shared.shape[:3] + (3, 2))
    want = jax.vjp(lambda a, b: _depthwise_by_conv(a, b, stride, padding), x,
                   broadcast)[1](ct)
    np.testing.assert_allclose(got[1], want[1].sum(axis=3, keepdims=True), rtol=1e-10,
                               atol=1e-10)
