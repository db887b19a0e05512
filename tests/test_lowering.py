"""Every jitted entry point lowered for GPUs (cuda) and TPUs on the CPU.

JAX lowers a program for a platform whose devices it does not have (`lowering_platforms`,
`jax.export`), so what would fail to lower on a GPU or a TPU fails here: platform-specific
lowering rules (the Pallas kernels above all), the `lax.platform_dependent` choices (the
reassembly's CPU row bands, the compositing executor's CPU form, the Pallas backends), and
the data-parallel step's shard_map over several devices. Lowering is the whole check: no
program is compiled for those platforms (that needs their compilers, i.e. the devices;
benchmarks/device_check.py runs them there).

Everything lowers for ("cuda", "tpu") in one multi-platform lowering (one trace, both
platforms' code in one module), except where the export API or the design says no:
- the Pallas kernels lower for one platform at a time (JAX lowers every branch of a
  `lax.platform_dependent` for each platform of a multi-platform lowering, and the Triton
  branch has no CPU or TPU lowering), and for TPUs they are refused by design;
- exports holding Triton calls serialise only with jax.export's custom-call check lifted
  (`DisabledSafetyCheck.custom_call`), and the train step's export does not serialise at
  all (its optimiser state holds optax pytree nodes jax.export has no serialisation for);
- the reconstruction demo's step is a closure inside `reconstruction_demo.fit`; its A2U
  layers are the resampler family's "a2u", lowered below.

The full network's step takes seconds to trace, so the default run lowers two of them (A2U
share, float32 on the XLA path and bfloat16 on the Pallas path); the rest of the (network x
dtype x implementation) grid and the exported serving function are marked slow.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from a2u_jax import export, ops, pallas_reassembly, parallel, predict, resamplers
from a2u_jax.training import loop, state as state_lib
from configs import a2u_matting
from data_pipeline import jax_composition, protocol
from tests.test_resamplers import PairNet

BOTH = ("cuda", "tpu")
TRITON_CALL = "__gpu$xla.gpu.triton"
# A program's Pallas kernels on a GPU: reassembly forward, kernel and feature cotangents.
KERNELS_PER_REASSEMBLY = 3


def lowered(jitted, *args, platforms=BOTH, **kwargs) -> str:
  """StableHLO text of `jitted` traced on abstract or concrete `args`, lowered for
  `platforms`."""
  return jitted.trace(*args, **kwargs).lower(lowering_platforms=platforms).as_text()


def triton_calls(text: str) -> int:
  """How many custom calls of Pallas' Triton kernels the module text holds."""
  return len(re.findall(r"custom_call @\"?" + re.escape(TRITON_CALL), text))


def assert_gpu_kernels(text: str, expected: int) -> None:
  """`expected` Pallas kernels, every one through Triton (the backend chosen explicitly:
  without it, jax 0.10 lowers Pallas with Mosaic GPU, and a trace-time interpret choice
  would leave no kernel at all)."""
  assert triton_calls(text) == expected
  assert "mosaic" not in text.lower()


def _spec(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


# ------------------------------------------------------------------ the Pallas kernels


REASSEMBLY_CASES = [("up", (1, 16, 16, 32), 3, 1), ("down", (1, 32, 32, 32), 4, 1),
                    ("up", (2, 8, 40, 130), 5, 2), ("down", (2, 8, 72, 96), 6, 3)]


def _reassembly_loss(direction, kernel_size, groups, implementation):
  op = ops.reassemble_up if direction == "up" else ops.reassemble_down

  def loss(features, kernels):
    out = op(features, kernels, kernel_size=kernel_size, groups=groups,
             implementation=implementation)
    return jnp.sum(out.astype(jnp.float32) ** 2)
  return loss


def _reassembly_specs(direction, shape, kernel_size, groups, dtype=jnp.float32):
  n, h, w, _ = shape
  side = (2 * h, 2 * w) if direction == "up" else (h // 2, w // 2)
  return _spec(shape, dtype), _spec((n, *side, kernel_size**2 * groups), dtype)


@pytest.mark.parametrize("direction,shape,kernel_size,groups,dtype", [
    *[case + (jnp.float32,) for case in REASSEMBLY_CASES],
    ("up", (1, 8, 8, 16), 3, 1, jnp.bfloat16),
    ("down", (1, 16, 16, 16), 4, 1, jnp.bfloat16)])
def test_pallas_reassembly_exports_for_cuda_as_triton_kernels(direction, shape, kernel_size,
                                                             groups, dtype):
  grad = jax.jit(jax.grad(_reassembly_loss(direction, kernel_size, groups, "pallas"),
                          argnums=(0, 1)))
  exported = jax.export.export(
      grad, platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(
          *_reassembly_specs(direction, shape, kernel_size, groups, dtype))
  assert exported.platforms == ("cuda",)
  assert_gpu_kernels(exported.mlir_module(), KERNELS_PER_REASSEMBLY)


def test_pallas_kernels_follow_the_lowering_platform_not_the_tracing_one():
  # One trace on the CPU, two lowerings: the interpreter (plain HLO, no kernel) for the CPU,
  # Triton for cuda.
  loss = _reassembly_loss("up", 3, 1, "pallas")
  traced = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(
      *_reassembly_specs("up", (1, 8, 8, 16), 3, 1))
  assert triton_calls(traced.lower(lowering_platforms=("cpu",)).as_text()) == 0
  assert_gpu_kernels(traced.lower(lowering_platforms=("cuda",)).as_text(),
                     KERNELS_PER_REASSEMBLY)
  assert_gpu_kernels(traced.lower(lowering_platforms=("rocm",)).as_text(),
                     KERNELS_PER_REASSEMBLY)


def test_pallas_kernels_under_shard_map_lower_for_cuda():
  runtime = parallel.DataParallel()
  loss = _reassembly_loss("down", 4, 1, "pallas")

  def step(features, kernels):
    return jax.lax.pmean(jax.grad(loss, argnums=(0, 1))(features, kernels), parallel.AXIS)

  sharded = runtime.step(step, in_specs=(parallel.SPLIT, parallel.SPLIT),
                         out_specs=parallel.REPLICATED)
  n = len(runtime.devices)
  assert n > 1
  text = lowered(sharded, *_reassembly_specs("down", (n, 16, 16, 8), 4, 1),
                 platforms=("cuda",))
  assert_gpu_kernels(text, KERNELS_PER_REASSEMBLY)


def test_pallas_is_refused_for_tpus_in_one_line_when_lowering_and_tracing(monkeypatch):
  grad = jax.jit(jax.grad(_reassembly_loss("up", 3, 1, "pallas"), argnums=(0, 1)))
  specs = _reassembly_specs("up", (1, 8, 8, 16), 3, 1)
  with pytest.raises(ValueError) as lowering:
    jax.export.export(grad, platforms=["tpu"])(*specs)
  assert str(lowering.value) == pallas_reassembly.TPU_REFUSAL
  # On a TPU host the refusal comes at trace time, before any lowering (a fresh function:
  # jit would reuse the trace above).
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(ValueError, match=r"^reassemble_up: implementation='pallas' has GPU "
                                       r"\(Triton\) kernels only.*'slices'\) on a TPU\.\n"):
    jax.eval_shape(_reassembly_loss("up", 3, 1, "pallas"), *specs)


def test_xla_reassembly_lowers_for_both_and_drops_the_cpu_row_bands():
  # The kernel cotangent runs in row bands on the CPU only (a platform_dependent choice).
  traced = jax.jit(jax.grad(_reassembly_loss("up", 5, 1, "slices"), argnums=(0, 1))).trace(
      *_reassembly_specs("up", (2, 32, 32, 64), 5, 1))
  accelerators = traced.lower(lowering_platforms=BOTH).as_text()
  cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
  assert accelerators.count("stablehlo.while") < cpu.count("stablehlo.while")
  assert triton_calls(accelerators) == 0


# ------------------------------------------------------------------- the resamplers


@pytest.mark.parametrize("name", resamplers.RESAMPLERS)
def test_every_resampler_lowers_forward_and_backward_for_both(name):
  net = PairNet(name)
  x = _spec((2, 16, 16, 32))
  variables = jax.eval_shape(net.init, jax.random.key(0), x)
  params = variables.get("params", {})
  rest = {k: v for k, v in variables.items() if k != "params"}

  def loss(params, x, rest):
    return jnp.sum(net.apply({"params": params, **rest}, x) ** 2)

  forward = lowered(jax.jit(net.apply), variables, x)
  backward = lowered(jax.jit(jax.grad(loss, argnums=(0, 1))), params, x, rest)
  assert "stablehlo" in forward and "stablehlo" in backward
  assert triton_calls(backward) == 0


# ----------------------------------------------------------------------- the network

CROP = 64


def _config(resampler: str, dtype: str, implementation: str | None
            ) -> ml_collections.ConfigDict:
  config = a2u_matting.get_config()
  if resampler == "unshare":
    a2u_matting.use_resampler(config, "a2u")
    config.model.resampler_options.share = False
  elif resampler != "a2u":
    a2u_matting.use_resampler(config, resampler)
  if implementation is not None:
    config.model.resampler_options.implementation = implementation
  config.dtype = dtype
  config.crop_size = CROP
  config.batch_size = 4
  return config


def _abstract_state(config, model):
  return jax.eval_shape(lambda key: state_lib.create_train_state(config, key, model),
                        jax.random.key(0))


def _abstract_batch(batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  image = _spec((batch_size, CROP, CROP, 3))
  return {"image": image, "fg": image, "bg": image,
          "alpha": _spec((batch_size, CROP, CROP, 1)),
          "trimap": _spec((batch_size, CROP, CROP, 1), jnp.uint8)}


def _train_step_module(resampler, dtype, implementation, platforms) -> str:
  """train.py's data-parallel step (shard_map over the four CPU devices of the tests; the
  state and key replicated, the batch split) exported for `platforms`."""
  config = _config(resampler, dtype, implementation)
  runtime = parallel.DataParallel()
  model = state_lib.model_from_config(config, axis_name=parallel.AXIS)
  step = loop.make_train_step(config, runtime)

  def placed(tree, sharding):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        tree)

  args = (placed(_abstract_state(config, model), runtime.replicated),
          placed(_abstract_batch(config.batch_size * len(runtime.devices)), runtime.split),
          placed(jax.eval_shape(lambda: jax.random.key(0)), runtime.replicated))
  if implementation == "pallas":
    # Serialisation refuses Triton's custom calls (jax.export's safety check): lowered only.
    return lowered(step, *args, platforms=platforms)
  exported = jax.export.export(step, platforms=platforms)(*args)
  # (Not serialised: the optimiser state's pytree holds optax nodes that jax.export has
  # no serialisation for; the exported module is what an accelerator compiles.)
  assert exported.nr_devices == len(runtime.devices) > 1
  return exported.mlir_module()


# (resampler, dtype, implementation, slow): the A2U network's reassemblies (encoder down
# and decoder up, four each) then hold 8 * 3 kernels on a GPU.
TRAIN_STEPS = [
    ("a2u", "float32", "slices", False),
    ("unshare", "bfloat16", "slices", True),
    ("a2u", "bfloat16", "pallas", False),
    ("a2u", "bfloat16", "slices", True),
    ("unshare", "float32", "slices", True),
    ("a2u", "float32", "pallas", True),
    ("unshare", "float32", "pallas", True),
    ("unshare", "bfloat16", "pallas", True),
    ("baseline", "float32", None, True),
    ("baseline", "bfloat16", None, True),
    ("carafe", "float32", None, True),
    ("carafe", "bfloat16", None, True),
]


@pytest.mark.parametrize("resampler,dtype,implementation", [
    pytest.param(*case[:3], marks=[pytest.mark.slow] if case[3] else [],
                 id="-".join(str(part) for part in case[:3])) for case in TRAIN_STEPS])
def test_train_step_lowers(resampler, dtype, implementation):
  if implementation == "pallas":
    assert_gpu_kernels(_train_step_module(resampler, dtype, implementation, ("cuda",)),
                       8 * KERNELS_PER_REASSEMBLY)
    return
  text = _train_step_module(resampler, dtype, implementation, BOTH)
  assert triton_calls(text) == 0
  # The cross-device reductions of the data-parallel step survive the lowering.
  assert "all_reduce" in text
  if dtype == "bfloat16":
    assert re.search(r"stablehlo.convolution.*bf16", text)


@pytest.fixture(scope="module")
def a2u_inference():
  config = _config("a2u", "float32", None)
  model = state_lib.model_from_config(config)
  variables = jax.eval_shape(
      lambda key: model.init(key, jnp.zeros((1, CROP, CROP, 4), jnp.float32)),
      jax.random.key(0))
  return model, variables


def test_model_init_lowers_for_both():
  config = _config("a2u", "float32", None)
  model = state_lib.model_from_config(config)
  assert "stablehlo" in lowered(jax.jit(model.init), jax.eval_shape(
      lambda: jax.random.key(0)), _spec((1, CROP, CROP, 4)))


def test_eval_forward_lowers_for_both_over_several_devices(a2u_inference):
  # Validation, a2u-evaluate and a2u-predict run this forward (predict.Predictor).
  model, variables = a2u_inference
  devices = tuple(jax.devices())
  forward, _ = predict._sharded_forward(model, devices)
  text = lowered(forward, variables, _spec((len(devices), CROP, CROP, 3)),
                 _spec((len(devices), CROP, CROP, 1), jnp.uint8))
  assert "stablehlo" in text and triton_calls(text) == 0


@pytest.mark.slow
def test_exported_serving_function_holds_both_platforms(a2u_inference):
  model, abstract = a2u_inference
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
  exported = export.export_model(model, variables, platforms=BOTH)
  assert exported.platforms == BOTH


# --------------------------------------------------------- the compositing executor


def _composition_batch(count: int, crop: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  plans = []
  for index in range(count):
    fg = rng.integers(0, 256, (48 + 8 * index, 40, 3), np.uint8)
    alpha = rng.integers(0, 256, fg.shape[:2], np.uint8)
    background = rng.integers(0, 256, (80, 96, 3), np.uint8)
    decisions = protocol.draw(3, index, num_foregrounds=1, num_backgrounds=1,
                              epoch_length=1)
    plans.append(jax_composition.plan(fg, alpha, fg, alpha, background, decisions, crop))
  return jax_composition.collate(plans)


def test_compositing_executor_lowers_batch_wide_for_both():
  batch = _composition_batch(2, 32)
  traced = jax.jit(jax_composition.compose_batch, static_argnames="crop_size").trace(
      batch, crop_size=32)
  accelerators = traced.lower(lowering_platforms=BOTH).as_text()
  cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
  # The CPU form loops over the examples (lax.map): one while loop more than batch-wide.
  assert accelerators.count("stablehlo.while") < cpu.count("stablehlo.while")


def test_split_compositing_executor_lowers_for_both_over_several_devices():
  runtime = parallel.DataParallel()
  batch = _composition_batch(len(runtime.devices), 32)
  compose = functools.partial(jax_composition.compose_batch, crop_size=32,
                              sharding=runtime.split)
  text = lowered(jax.jit(compose), batch)
  assert "stablehlo" in text
