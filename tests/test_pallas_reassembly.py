"""The reassembly's Pallas kernels (implementation="pallas") against the XLA formulas.

On the CPU the kernels run in Pallas' interpret mode: the same kernel bodies, indexing and
padding as on a GPU, so these tests check everything but Triton's code generation (the
GPU check is `benchmarks/device_check.py --sections kernels`). The authors' outputs are
checked in tests/test_ops.py (every implementation) and their float64 network gradients
in tests/test_reference.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from a2u_jax import pallas_reassembly
from tests.test_ops import OPS, _forward_backward, _random_case

# (direction, features shape, kernel size, groups): K=1, one-pixel maps, odd groups, and
# rows wider than one BW block and channel groups wider than one BC block, whose widths
# and channels are padded.
SHAPES = [
    ("up", (2, 3, 5, 6), 3, 1),
    ("up", (1, 1, 1, 4), 3, 2),
    ("up", (1, 2, 3, 6), 1, 3),
    ("up", (1, 3, 4, 6), 5, 3),
    ("up", (1, 2, pallas_reassembly.MAX_BLOCK_WIDTH + 3, 80), 3, 1),
    ("down", (2, 6, 10, 6), 6, 1),
    ("down", (1, 2, 2, 4), 6, 2),
    ("down", (2, 6, 4, 6), 2, 3),
    ("down", (1, 4, 2 * pallas_reassembly.MAX_BLOCK_WIDTH + 8, 130), 4, 2),
]


@pytest.mark.parametrize("direction,shape,kernel_size,groups", SHAPES)
def test_forward_and_both_cotangents_equal_the_xla_formulas_in_float64(
    direction, shape, kernel_size, groups):
  with jax.enable_x64(True):
    features, kernels = _random_case(direction, shape, kernel_size, groups, seed=7,
                                     dtype=np.float64)
    results = {}
    for implementation in ("slices", "pallas"):
      fn = functools.partial(OPS[direction], kernel_size=kernel_size, groups=groups,
                             implementation=implementation)
      cotangent = np.random.default_rng(8).normal(
          size=jax.eval_shape(fn, features, kernels).shape)
      results[implementation] = _forward_backward(fn)(features, kernels, cotangent)
    for name, got, want in zip(("output", "d features", "d kernels"), results["pallas"],
                               results["slices"]):
      assert got.dtype == jnp.float64
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("direction,shape,kernel_size,groups", [
    ("up", (1, 2, 3, 4), 3, 2), ("down", (1, 4, 6, 2), 6, 1)])
def test_gradients_match_finite_differences_in_float64(direction, shape, kernel_size,
                                                        groups):
  with jax.enable_x64(True):
    features, kernels = _random_case(direction, shape, kernel_size, groups, seed=9,
                                     dtype=np.float64)
    fn = functools.partial(OPS[direction], kernel_size=kernel_size, groups=groups,
                           implementation="pallas")
    check_grads(jax.jit(fn), (features, kernels), order=1, modes=("rev",), atol=1e-8,
                rtol=1e-8)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_bfloat16_inputs_accumulate_in_float32_like_the_xla_formulas(direction):
  k = 3 if direction == "up" else 6
  features, kernels = _random_case(direction, (1, 4, 6, 8), k, 1, seed=10)
  low = (jnp.asarray(features, jnp.bfloat16), jnp.asarray(kernels, jnp.bfloat16))
  cotangent = jnp.ones((1,) + ((8, 12) if direction == "up" else (2, 3)) + (8,),
                       jnp.bfloat16)
  got, want = (_forward_backward(functools.partial(OPS[direction], kernel_size=k,
                                                   implementation=implementation))(
                   *low, cotangent) for implementation in ("pallas", "slices"))
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    # Both accumulate in float32 and round once: at most one bfloat16 ulp apart.
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=2 ** -7, atol=2 ** -7)



@pytest.mark.parametrize("direction", ["up", "down"])
def test_gradients_under_shard_map_match_the_unsharded_ones(direction):
  """Data-parallel training runs the ops inside shard_map (device-varying operands). On the
  CPU the XLA formulas stand in there (no Pallas interpreter runs inside shard_map; see
  `pallas_reassembly.by_platform`); tests/test_lowering.py lowers the same step's Triton
  kernels for cuda, and benchmarks/device_check.py --sections kernels runs them."""
  k = 3 if direction == "up" else 4
  features, kernels = _random_case(direction, (2, 4, 6, 8), k, 1, seed=11)
  mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:2]), ("batch",))

  def loss(f, m, implementation):
    return jnp.sum(OPS[direction](f, m, kernel_size=k, implementation=implementation) ** 2)

  spec = jax.sharding.PartitionSpec("batch")
  sharded = jax.jit(jax.shard_map(jax.grad(functools.partial(loss, implementation="pallas"),
                                           (0, 1)),
                                  mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec)))
  expected = jax.grad(functools.partial(loss, implementation="slices"), (0, 1))(features,
                                                                               kernels)
  for got, want in zip(sharded(features, kernels), expected):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
