"""The full network against the authors' code: outputs and autograd gradients for the
"rule 0" weights (tests/data/reference, shipped with the tests).

float64 mode (`dtype=jnp.float64` under `jax.enable_x64`) computes everything in float64,
InPlaceABN and the output included, so it reproduces the authors' float64 autograd to
rounding; float32 is held to what its rounding allows.

Measured (two-core CPU): float64 output 6e-15 and input gradient 1e-15 from the authors',
generator parameter gradients at most 2e-12 (share) and 1e-14 (unshare); float32 input
gradient 3e-7.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2u_jax import convert, models
from tests.conftest import REFERENCE, rule0_state_dict

SHARES = ("share", "unshare")


def _nhwc(array):
  return np.transpose(array, (0, 2, 3, 1))


def _relative(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _variables(share, dtype):
  variables = convert.from_torch_state_dict(rule0_state_dict(share))
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)


@pytest.mark.parametrize("share", SHARES)
def test_rule0_output_matches_the_authors_in_float32(share):
  reference = np.load(REFERENCE / f"a2u_matting_{share}_rule0.npz")
  model = models.a2u_matting(share=share == "share")
  # Full float32 products: on GPUs JAX's default for float32 convolutions is TF32, which
  # moved this output by 2.6e-3 (relative) on an H200; CPUs compute float32 either way.
  with jax.default_matmul_precision("highest"):
    out = jax.jit(model.apply)(_variables(share, jnp.float32),
                               _nhwc(reference["input_nchw"]))
  assert out.dtype == jnp.float32
  assert _relative(out, _nhwc(reference["output_nchw"])) < 1e-5


def _gradients(share, dtype, implementation=None):
  """(output, input gradient, parameter gradients) of sum(output * R), eval mode."""
  reference = np.load(REFERENCE / f"a2u_matting_{share}_rule0_grad.npz")
  model = models.a2u_matting(share=share == "share", dtype=dtype,
                             implementation=implementation)
  variables = _variables(share, dtype)
  x = jnp.asarray(_nhwc(reference["input_nchw"]), dtype)
  r = jnp.asarray(_nhwc(reference["r_nchw"]), dtype)

  def loss(params, x):
    out = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
    return jnp.sum(out * r), out

  (_, out), (param_grads, input_grad) = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True))(variables["params"], x)
  return reference, out, input_grad, param_grads


def _reference_param_grads(reference, param_grads):
  """The authors' generator gradients in our layout, beside ours: (name, ours, theirs)."""
  theirs = {key[len("param_grad/"):]: reference[key] for key in reference.files
            if key.startswith("param_grad/")}
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float64),
                        {"params": param_grads})
  converted = convert.convert_into(theirs, target, convert.official_layout(),
                                   require_all_leaves=False)
  pairs = []
  for path, want in jax.tree_util.tree_flatten_with_path(converted["params"])[0]:
    keys = tuple(p.key for p in path)
    got = param_grads
    for key in keys:
      got = got[key]
    pairs.append(("/".join(keys), got, want))
  return pairs


# Each case compiles the network's gradient (~30 s on two cores): unshare runs with -m slow.
# "pallas" runs the reassembly's Pallas kernels (interpret mode on the CPU: ~30 s, slow).
@pytest.mark.parametrize("share,implementation", [
    ("share", None), pytest.param("unshare", None, marks=pytest.mark.slow),
    pytest.param("share", "pallas", marks=pytest.mark.slow)])
def test_float64_gradients_are_the_authors(share, implementation):
  with jax.enable_x64(True):
    reference, out, input_grad, param_grads = _gradients(share, jnp.float64, implementation)
    assert out.dtype == jnp.float64 and input_grad.dtype == jnp.float64
    assert _relative(out, _nhwc(reference["output_nchw_float64"])) < 1e-9
    assert _relative(input_grad, _nhwc(reference["input_grad_nchw"])) < 1e-7
    pairs = _reference_param_grads(reference, param_grads)
    # Every parameter of the four kernel generators: two 1x1 encodings, two mixings (kernel
    # and bias each) and two GroupNorms (scale and bias) per generator.
    assert len(pairs) == 4 * 12
    worst = max((_relative(got, want), name) for name, got, want in pairs)
    assert worst[0] < 1e-5, worst


@pytest.mark.slow  # ~30 s each on two cores
@pytest.mark.parametrize("share", SHARES)
def test_float32_input_gradient_is_the_authors_within_float32_rounding(share):
  reference, out, input_grad, _ = _gradients(share, jnp.float32)
  assert input_grad.dtype == jnp.float32
  assert _relative(input_grad, _nhwc(reference["input_grad_nchw"])) < 1e-4
