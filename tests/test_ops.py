"""Reassembly ops: exactness, gradients, transformations, dtypes, memory, bad input."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from a2u_jax import ops
from tests import loop_reference

OPS = {"up": ops.reassemble_up, "down": ops.reassemble_down}
LOOPS = {"up": loop_reference.reassemble_up, "down": loop_reference.reassemble_down}
CASES = ["up0", "up1", "up2", "up3", "down0", "down1", "down2", "down3"]
# The XLA formulas; the Pallas kernels' own tests (interpret mode, which is slow to
# compile) are in tests/test_pallas_reassembly.py.
XLA_IMPLEMENTATIONS = ("slices", "gather")


def _nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def _random_case(direction, shape, kernel_size, groups, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  n, h, w, _ = shape
  spatial = (2 * h, 2 * w) if direction == "up" else (h // 2, w // 2)
  features = rng.normal(size=shape).astype(dtype)
  kernels = rng.uniform(0.1, 1.0, size=(n,) + spatial + (kernel_size**2 * groups,))
  return features, kernels.astype(dtype)


def _forward_backward(fn):
  """Jitted (f, m, ct) -> (fn(f, m), d/df, d/dm) for the cotangent ct."""

  @jax.jit
  def both(f, m, ct):
    out, vjp = jax.vjp(fn, f, m)
    return (out,) + vjp(ct)

  return both


# (direction, features shape, kernel size, groups): 1x1 maps, K=1, odd group counts.
RANDOM_SHAPES = [
    ("up", (2, 5, 7, 6), 3, 1),
    ("up", (1, 1, 1, 4), 3, 2),
    ("up", (2, 4, 3, 6), 1, 3),
    ("up", (1, 3, 4, 6), 5, 3),
    ("up", (1, 2, 2, 4), 7, 2),
    ("down", (2, 10, 14, 6), 6, 1),
    ("down", (1, 2, 2, 4), 6, 2),
    ("down", (2, 6, 4, 6), 2, 3),
    ("down", (1, 8, 6, 6), 4, 3),
]


@pytest.mark.parametrize("implementation", ops.IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
def test_matches_authors_kernels(reassembly_reference, case, implementation):
  features = _nhwc(reassembly_reference[f"{case}/features_nchw"])
  kernels = _nhwc(reassembly_reference[f"{case}/kernels_nchw"])
  expected = _nhwc(reassembly_reference[f"{case}/output_nchw"])
  kernel_size, groups = (int(v) for v in reassembly_reference[f"{case}/kernel_size_groups"])
  out = OPS[case[:-1]](features, kernels, kernel_size=kernel_size, groups=groups,
                       implementation=implementation)
  chex.assert_shape(out, expected.shape)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


class LoopReferenceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_random_shapes_match_loop(self):
    for direction, shape, k, g in RANDOM_SHAPES:
      features, kernels = _random_case(direction, shape, k, g, dtype=np.float32)
      expected = LOOPS[direction](features, kernels, k, g)
      for implementation in XLA_IMPLEMENTATIONS:
        fn = self.variant(functools.partial(OPS[direction], kernel_size=k, groups=g,
                                            implementation=implementation))
        out = fn(features, kernels)
        chex.assert_shape(out, expected.shape)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5,
                                   err_msg=f"{direction} {shape} K={k} G={g} {implementation}")


@pytest.mark.parametrize("direction,shape,kernel_size,groups", RANDOM_SHAPES)
def test_implementations_agree_forward_and_backward(direction, shape, kernel_size, groups):
  features, kernels = _random_case(direction, shape, kernel_size, groups, seed=1)
  results = []
  for implementation in XLA_IMPLEMENTATIONS:
    fn = functools.partial(OPS[direction], kernel_size=kernel_size, groups=groups,
                           implementation=implementation)
    cotangent = np.random.default_rng(2).normal(
        size=jax.eval_shape(fn, features, kernels).shape).astype(np.float32)
    results.append(_forward_backward(fn)(features, kernels, cotangent))
  chex.assert_trees_all_close(*results, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", XLA_IMPLEMENTATIONS)
@pytest.mark.parametrize("direction,shape,kernel_size,groups", [
    ("up", (2, 3, 4, 4), 3, 1), ("up", (1, 2, 3, 6), 5, 3), ("up", (1, 1, 1, 2), 1, 1),
    ("down", (2, 6, 8, 4), 6, 1), ("down", (1, 4, 4, 6), 4, 3), ("down", (1, 2, 2, 2), 2, 2),
])
def test_gradients_are_exact_in_float64(direction, shape, kernel_size, groups,
                                         implementation):
  with jax.enable_x64(True):
    features, kernels = _random_case(direction, shape, kernel_size, groups, seed=3,
                                     dtype=np.float64)
    fn = functools.partial(OPS[direction], kernel_size=kernel_size, groups=groups,
                           implementation=implementation)
    # Jitted: the eager path runs the same custom VJP (LoopReferenceTest runs both ways).
    check_grads(jax.jit(fn), (features, kernels), order=1, modes=("rev",), atol=1e-8,
                rtol=1e-8)


@pytest.mark.parametrize("band_rows", [None, 2])
@pytest.mark.parametrize("direction,shape,kernel_size,groups", [
    ("up", (2, 7, 5, 4), 3, 2), ("up", (1, 5, 3, 2), 5, 1),
    ("down", (2, 10, 6, 4), 6, 1), ("down", (1, 6, 10, 2), 4, 2),
])
def test_kernel_cotangent_in_row_bands_is_exact(monkeypatch, direction, shape, kernel_size,
                                                groups, band_rows):
  """The kernel cotangent's two schedules: all rows at once (accelerators), and bands of
  two output rows per example (the CPU's, here with ragged last bands)."""
  if band_rows is None:
    monkeypatch.setattr(ops, "BANDED_PLATFORMS", ())
  else:
    n, h, w, c = shape
    # Cotangent bytes per output row of a band: float64, both output phases for up.
    row_bytes = 8 * c * (2 * 2 * w if direction == "up" else w // 2)
    monkeypatch.setattr(ops, "BAND_BYTES", band_rows * row_bytes)
  with jax.enable_x64(True):
    features, kernels = _random_case(direction, shape, kernel_size, groups, seed=5,
                                     dtype=np.float64)
    fn = functools.partial(OPS[direction], kernel_size=kernel_size, groups=groups)
    check_grads(jax.jit(fn), (features, kernels), order=1, modes=("rev",), atol=1e-8,
                rtol=1e-8)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_vmap_matches_batched_call(direction):
  k = 3 if direction == "up" else 4
  features, kernels = _random_case(direction, (3, 4, 6, 4), k, 2, seed=4)
  fn = functools.partial(OPS[direction], kernel_size=k, groups=2)
  per_sample = jax.vmap(lambda f, m: fn(f[None], m[None])[0])(features, kernels)
  chex.assert_trees_all_close(per_sample, fn(features, kernels), rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
@pytest.mark.parametrize("direction", ["up", "down"])
def test_pmap_over_fake_devices(direction):
  # The CPU platform's devices: four fake ones (conftest) whatever the default backend is.
  cpus = jax.devices("cpu")
  assert len(cpus) == 4, "conftest should give four fake CPU devices"
  devices = len(cpus)
  k = 3 if direction == "up" else 6
  features, kernels = _random_case(direction, (2 * devices, 4, 6, 4), k, 1, seed=5)
  fn = functools.partial(OPS[direction], kernel_size=k)

  def loss(f, m):
    return jnp.sum(fn(f, m) ** 2)

  sharded = jax.pmap(jax.value_and_grad(loss, argnums=(0, 1)), devices=cpus)
  split = lambda x: x.reshape((devices, -1) + x.shape[1:])
  values, grads = sharded(split(features), split(kernels))
  expected_value, expected_grads = jax.value_and_grad(loss, argnums=(0, 1))(features, kernels)
  np.testing.assert_allclose(values.sum(), expected_value, rtol=1e-5)
  chex.assert_trees_all_close(jax.tree.map(lambda g: g.reshape((-1,) + g.shape[2:]), grads),
                              expected_grads, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tolerance", [(jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)])
@pytest.mark.parametrize("direction", ["up", "down"])
def test_low_precision_accumulates_in_float32(direction, dtype, tolerance):
  k = 3 if direction == "up" else 6
  features, kernels = _random_case(direction, (1, 8, 8, 8), k, 1, seed=6)
  low_f, low_m = jnp.asarray(features, dtype), jnp.asarray(kernels, dtype)
  fn = functools.partial(OPS[direction], kernel_size=k)
  out = jax.jit(fn)(low_f, low_m)
  assert out.dtype == dtype
  # The same low-precision inputs, evaluated exactly: only the final rounding may differ.
  exact = LOOPS[direction](np.asarray(low_f, np.float32), np.asarray(low_m, np.float32), k)
  np.testing.assert_allclose(np.asarray(out, np.float32), exact, rtol=tolerance,
                             atol=tolerance)
  grads = jax.grad(lambda f, m: jnp.sum(fn(f, m).astype(jnp.float32)), (0, 1))(low_f, low_m)
  assert grads[0].dtype == dtype and grads[1].dtype == dtype


def test_float64_stays_float64():
  with jax.enable_x64(True):
    features, kernels = _random_case("up", (1, 3, 3, 2), 3, 1, dtype=np.float64)
    out = ops.reassemble_up(features, kernels, kernel_size=3)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, loop_reference.reassemble_up(features, kernels, 3),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("implementation", XLA_IMPLEMENTATIONS)
@pytest.mark.parametrize("direction,shape,k", [("up", (1, 64, 64, 32), 3),
                                               ("down", (1, 128, 128, 32), 6)])
def test_backward_needs_no_patch_tensor(direction, shape, k, implementation):
  """XLA's own memory analysis: temporaries of forward+backward <= 3x inputs+outputs.

  A K*K patch tensor alone would be 9x (up) or 36x/4 = 9x (down) the feature map.
  """
  features, kernels = _random_case(direction, shape, k, 1)
  fn = functools.partial(OPS[direction], kernel_size=k, implementation=implementation)

  out_shape = jax.eval_shape(fn, features, kernels)
  ct = jnp.ones(out_shape.shape, out_shape.dtype)
  compiled = _forward_backward(fn).lower(features, kernels, ct).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  io_bytes = 4 * (2 * features.size + 2 * kernels.size + 2 * ct.size)
  assert temp <= 3 * io_bytes, (temp, io_bytes)


BAD_INPUTS = [
    # (direction, features shape, kernels shape, kwargs, message fragment)
    ("up", (2, 4, 4), (2, 8, 8, 9), {}, "rank-4"),
    ("up", (2, 4, 4, 4), (2, 8, 8, 8), {}, "kernel_size**2 * groups"),
    ("up", (2, 4, 4, 3), (2, 8, 8, 18), {"groups": 2}, "divisible by `groups`"),
    ("up", (2, 4, 4, 4), (2, 8, 6, 9), {}, "spatially 2x"),
    ("up", (2, 4, 4, 4), (2, 8, 8, 16), {"kernel_size": 4}, "must be odd"),
    ("up", (2, 4, 4, 4), (1, 8, 8, 9), {}, "batch size"),
    ("down", (2, 5, 4, 4), (2, 2, 2, 36), {}, "must be even"),
    ("down", (2, 4, 4, 4), (2, 2, 2, 25), {"kernel_size": 5}, "must be even"),
    ("down", (2, 4, 4, 4), (2, 4, 4, 36), {}, "spatially half"),
    ("down", (2, 4, 4, 4), (2, 2, 2, 36), {"implementation": "cuda"}, "implementation"),
    ("down", (2, 4, 4, 4), (2, 2, 2, 0), {"kernel_size": 0}, "positive int"),
]


@pytest.mark.parametrize("direction,f_shape,m_shape,kwargs,message", BAD_INPUTS)
def test_bad_input_raises_value_error(direction, f_shape, m_shape, kwargs, message):
  kwargs = {"kernel_size": 3 if direction == "up" else 6, **kwargs}
  with pytest.raises(ValueError, match=re.escape(message)):
    OPS[direction](jnp.zeros(f_shape), jnp.zeros(m_shape), **kwargs)


def test_integer_input_is_rejected():
  with pytest.raises(ValueError, match="features.*floating"):
    ops.reassemble_up(jnp.zeros((1, 2, 2, 1), jnp.int32), jnp.zeros((1, 4, 4, 9)),
                      kernel_size=3)


def test_errors_are_raised_at_trace_time_under_jit():
  traced = jax.jit(functools.partial(ops.reassemble_down, kernel_size=6))
  with pytest.raises(ValueError, match="spatially half"):
    traced.lower(jax.ShapeDtypeStruct((1, 4, 4, 2), jnp.float32),
                 jax.ShapeDtypeStruct((1, 4, 4, 36), jnp.float32))


def test_gradients_under_shard_map_match_the_unsharded_ones():
  """Data-parallel training runs the ops inside shard_map (device-varying values)."""
  if jax.device_count() < 2:
    pytest.skip("needs 2 (fake) devices")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("batch",))
  rng = np.random.default_rng(0)
  f = jnp.asarray(rng.standard_normal((2, 4, 4, 16)), jnp.float32)
  m = jnp.asarray(rng.random((2, 8, 8, 9)), jnp.float32)

  def loss(f, m):
    return jnp.sum(ops.reassemble_up(f, m, kernel_size=3) ** 2)

  spec = jax.sharding.PartitionSpec("batch")
  # Each device differentiates the loss of its own example; the loss is a sum over
  # examples, so together they are the whole batch's gradient.
  sharded = jax.jit(jax.shard_map(jax.grad(loss, (0, 1)), mesh=mesh, in_specs=(spec, spec),
                                  out_specs=(spec, spec)))
  got = sharded(f, m)
  expected = jax.grad(loss, (0, 1))(f, m)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)
