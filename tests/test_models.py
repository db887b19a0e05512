"""The matting network: sizes, the authors' outputs, conversion, checkpoints and their
migration, CLI, compilation."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from a2u_jax import checkpointing, convert, models
from a2u_jax.models import blocks
from tests.conftest import random_torch_state_dict



def _nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def _param_count(model):
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 4)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def _reference_state_dict(matting_reference):
  return {k[len("state_dict/"):]: v for k, v in matting_reference.items()
          if k.startswith("state_dict/")}


@pytest.mark.parametrize("model,expected", [(models.a2u_matting(), 8_089_235),
                                            (models.a2u_matting(share=False), 8_269_451)])
def test_parameter_counts_match_the_authors_model(model, expected):
  assert _param_count(model) == expected


def test_baseline_differs_by_exactly_the_four_generators():
  generators = _param_count(models.a2u_matting()) - _param_count(models.baseline_matting())
  assert generators == 40_232


def test_converted_reference_reproduces_authors_output_and_intermediates(matting_reference):
  variables = convert.from_torch_state_dict(_reference_state_dict(matting_reference))
  model = models.a2u_matting()
  x = _nhwc(matting_reference["input_nchw"])
  out, state = jax.jit(lambda v, x: model.apply(
      v, x, train=False, mutable=["intermediates"],
      capture_intermediates=lambda m, _: m.name in ("stem", "generator", "aspp")))(variables, x)
  captured = state["intermediates"]

  def rel_l2(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))

  down, up = captured["down0"]["generator"]["__call__"][0]
  checks = {
      "layer0": (captured["stem"]["__call__"][0], "intermediate/layer0"),
      "bilinear0 down": (down, "intermediate/bilinear0_down_kernels"),
      "bilinear0 up": (up, "intermediate/bilinear0_up_kernels"),
      "aspp": (captured["aspp"]["__call__"][0], "intermediate/aspp"),
      "output": (out, "output_nchw"),
  }
  for stage, (ours, key) in checks.items():
    expected = _nhwc(matting_reference[key])
    chex.assert_shape(ours, expected.shape)
    assert rel_l2(ours, expected) <= 1e-4, f"{stage}: relative L2 {rel_l2(ours, expected)}"


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_unshare_checkpoint_converts_and_runs():
  state = random_torch_state_dict("unshare")
  assert convert.detect_model_config(state) == {"resampler": "a2u",
                                                "resampler_options": {"share": False}}
  variables = convert.from_torch_state_dict({"state_dict": state})
  out = jax.jit(models.a2u_matting(share=False).apply)(variables, jnp.ones((1, 32, 48, 4)))
  chex.assert_shape(out, (1, 32, 48, 1))
  chex.assert_tree_all_finite(out)


def test_conversion_reports_unknown_missing_and_misshaped_keys():
  state = random_torch_state_dict("share")
  state["module.extra.weight"] = np.zeros(3, np.float32)
  del state["module.layer1.block1.convs.conv1.weight"]
  state["module.pred.1.weight"] = np.zeros((1, 1, 5, 5), np.float32)
  with pytest.raises(ValueError) as error:
    convert.from_torch_state_dict(state)
  message = str(error.value)
  assert "unknown keys 1: extra.weight" in message
  assert "missing" in message and "layer1/block1/conv1/conv/kernel" in message
  assert "mis-shaped keys 1: pred.1.weight" in message


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_cli_round_trip_and_refusal_to_overwrite(tmp_path, matting_reference):
  source = tmp_path / "reference.npz"
  np.savez(source, **{f"state_dict/module.{k}": v
                      for k, v in _reference_state_dict(matting_reference).items()})
  out_dir = tmp_path / "ckpt"
  convert.main(["--torch", str(source), "--out", str(out_dir)])
  model, variables = checkpointing.load_model_checkpoint(out_dir)
  assert model == models.a2u_matting()
  direct = convert.from_torch_state_dict(_reference_state_dict(matting_reference))
  x = _nhwc(matting_reference["input_nchw"])
  apply = jax.jit(model.apply)  # one compilation serves both
  np.testing.assert_array_equal(apply(variables, x), apply(direct, x))
  with pytest.raises(SystemExit):
    convert.main(["--torch", str(source), "--out", str(out_dir)])
  convert.main(["--torch", str(source), "--out", str(out_dir), "--force"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "reference.npz"]


def test_cli_round_trip_through_a_pth_file(tmp_path):
  torch = pytest.importorskip("torch", reason="writing a .pth needs torch (extra 'torch')")
  state = random_torch_state_dict("share", seed=3)
  path = tmp_path / "model_best.pth"
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
  convert.main(["--torch", str(path), "--out", str(tmp_path / "ckpt")])
  model, variables = checkpointing.load_model_checkpoint(tmp_path / "ckpt")
  assert model == models.a2u_matting()
  x = jnp.linspace(-1, 1, 32 * 32 * 4).reshape(1, 32, 32, 4)
  apply = jax.jit(model.apply)
  np.testing.assert_array_equal(apply(variables, x),
                                apply(convert.from_torch_state_dict(state), x))


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_checkpoints_of_the_first_layout_load_and_give_the_same_output(tmp_path):
  """Format 1 (before A2U went through make_resampler): A2U's options were model.json keys
  of their own and its generators top-level variables gen0..gen3."""
  state = random_torch_state_dict("unshare", seed=4)
  variables = convert.from_torch_state_dict(state)
  first_layout = {collection: {(f"gen{name[-1]}" if name.startswith("down") else name):
                               (tree[name]["generator"] if name.startswith("down") else tree[name])
                               for name in tree}
                  for collection, tree in variables.items()}
  assert {"gen0", "gen3", "stem"} <= set(first_layout["params"])
  folder = checkpointing.save_model_checkpoint(tmp_path / "model", first_layout, {})
  (folder / "model.json").write_text(json.dumps({
      "resampler": "a2u", "share": False, "up_kernel_size": 3, "encode_kernel_size": 6,
      "rank": 1, "groups": 1, "dropout_rate": 0.5}))
  model, loaded = checkpointing.load_model_checkpoint(folder)
  assert model == models.build_model({"resampler": "a2u", "dropout_rate": 0.5,
                                      "resampler_options": {
                                          "share": False, "up_kernel_size": 3,
                                          "encode_kernel_size": 6, "rank": 1, "groups": 1}})
  x = jnp.linspace(-1, 1, 32 * 32 * 4).reshape(1, 32, 32, 4)
  apply = jax.jit(model.apply)
  np.testing.assert_array_equal(apply(loaded, x), apply(variables, x))
  # Saving it again writes the current format, which loads without migration.
  again = checkpointing.save_model_checkpoint(tmp_path / "again", loaded,
                                              {"resampler": "a2u",
                                               **{"resampler_options": {"share": False}}})
  assert json.loads((again / "model.json").read_text())["format_version"] == (
      checkpointing.FORMAT_VERSION)
  chex.assert_trees_all_equal(checkpointing.load_model_checkpoint(again)[1], loaded)


def test_first_layout_migration_of_other_operators_and_unknown_versions(tmp_path):
  config, migrated = checkpointing.migrate_from_version_1(
      {"resampler": "indexnet", "resampler_options": {"index": "holistic"}},
      {"params": {"gen0": {"index": 1}, "up0": {"w": 2}, "stem": {"w": 3}},
       "batch_stats": {"gen3": {"bn": 4}}})
  assert config == {"resampler": "indexnet", "resampler_options": {"index": "holistic"}}
  assert migrated == {"params": {"down0": {"index": 1}, "up0": {"w": 2}, "stem": {"w": 3}},
                      "batch_stats": {"down3": {"bn": 4}}}
  with pytest.raises(ValueError, match="model options share are not MattingNet's.*go under "
                                       "resampler_options"):
    models.build_model({"resampler": "a2u", "share": True})
  folder = checkpointing.save_model_checkpoint(tmp_path / "model", {"params": {}}, {})
  (folder / "model.json").write_text(json.dumps({"resampler": "a2u", "format_version": 9}))
  with pytest.raises(ValueError, match="model.json: format_version 9 is not one this a2u-jax"):
    checkpointing.load_model_checkpoint(folder)


def test_cli_failure_leaves_nothing_behind(tmp_path):
  bad = tmp_path / "bad.npz"
  np.savez(bad, **{"state_dict/module.bilinear0.bconv_U.1.weight": np.zeros((1, 64, 1, 1))})
  with pytest.raises(SystemExit):
    convert.main(["--torch", str(bad), "--out", str(tmp_path / "ckpt")])
  assert [p.name for p in tmp_path.iterdir()] == ["bad.npz"]


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_torchvision_resnet34_initialises_the_encoder():
  rng = np.random.default_rng(0)
  model = models.a2u_matting()
  variables = jax.tree.map(np.asarray,
                           jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 4))))
  # A stand-in torchvision state dict: every key the mapping reads, in torch's layouts.
  tv = {"conv1.weight": rng.normal(size=(64, 3, 7, 7)).astype(np.float32)}
  for prefix, path, kind in convert._torchvision_layout():
    for key, collection, leaf in convert._leaves(kind, prefix):
      shape = convert._get(variables, (collection,) + path + (leaf,)).shape
      if kind == "conv":
        shape = (shape[3], shape[2], shape[0], shape[1])   # HWIO -> OIHW
      tv.setdefault(key, rng.normal(size=shape).astype(np.float32))
  tv["fc.weight"] = np.zeros((1000, 512), np.float32)
  merged = convert.from_torchvision_resnet34(tv, variables)
  stem = merged["params"]["stem"]["conv"]["kernel"]
  np.testing.assert_array_equal(stem[:, :, :3], np.transpose(tv["conv1.weight"], (2, 3, 1, 0)))
  np.testing.assert_array_equal(stem[:, :, 3], 0)
  np.testing.assert_array_equal(merged["params"]["layer3_2"]["block3"]["conv2"]["bn"]["scale"],
                                tv["layer3.3.bn2.weight"])
  np.testing.assert_array_equal(merged["batch_stats"]["layer2_1"]["proj"]["bn"]["mean"],
                                tv["layer2.0.downsample.1.running_mean"])
  # The decoder and generators keep their initial values.
  np.testing.assert_array_equal(merged["params"]["down0"]["generator"]["mix_up"]["kernel"],
                                variables["params"]["down0"]["generator"]["mix_up"]["kernel"])


@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_same_shape_compiles_once():
  model = models.baseline_matting()
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 4)))
  traces = []

  @jax.jit
  def predict(v, x):
    traces.append(x.shape)
    return model.apply(v, x)

  predict(variables, jnp.zeros((1, 32, 32, 4)))
  predict(variables, jnp.ones((1, 32, 32, 4)))
  predict(variables, jnp.zeros((1, 48, 32, 4)))
  assert traces == [(1, 32, 32, 4), (1, 48, 32, 4)]


def test_train_mode_updates_batch_stats_and_uses_dropout():
  model = models.baseline_matting()  # the same batch norms and dropout as A2U's, faster
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 4))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  train_apply = jax.jit(lambda v, x, key: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                      rngs={"dropout": key}))
  out, updates = train_apply(variables, x, jax.random.key(2))
  chex.assert_shape(out, (2, 32, 32, 1))
  before = variables["batch_stats"]["stem"]["bn"]["mean"]
  after = updates["batch_stats"]["stem"]["bn"]["mean"]
  assert not np.allclose(before, after)
  out2, _ = train_apply(variables, x, jax.random.key(3))
  assert not np.allclose(out, out2)  # a different dropout mask


def test_abn_matches_its_definition_in_both_modes():
  x = jax.random.normal(jax.random.key(0), (4, 5, 6, 3)) * 2 + 1
  abn = blocks.ABN()
  variables = {"params": {"scale": jnp.array([-0.5, 1.0, 2.0]), "bias": jnp.array([0.1, 0, -1])},
               "batch_stats": {"mean": jnp.array([0.2, 0.0, 1.0]), "var": jnp.array([1.0, 2, 3])}}
  leaky = lambda y: np.where(y >= 0, y, 0.01 * y)
  scale = np.abs(variables["params"]["scale"]) + 1e-5
  expected = leaky((x - variables["batch_stats"]["mean"]) /
                   np.sqrt(variables["batch_stats"]["var"] + 1e-5) * scale +
                   variables["params"]["bias"])
  np.testing.assert_allclose(abn.apply(variables, x, train=False), expected, rtol=1e-5,
                             atol=1e-6)
  out, updates = abn.apply(variables, x, train=True, mutable=["batch_stats"])
  mean, var = np.mean(x, (0, 1, 2)), np.var(x, (0, 1, 2))
  np.testing.assert_allclose(out, leaky((x - mean) / np.sqrt(var + 1e-5) * scale +
                                        variables["params"]["bias"]), rtol=1e-4, atol=1e-5)
  n = 4 * 5 * 6
  np.testing.assert_allclose(updates["batch_stats"]["var"],
                             0.9 * variables["batch_stats"]["var"] + 0.1 * var * n / (n - 1),
                             rtol=1e-5)


@pytest.mark.parametrize("shape,message", [((1, 32, 32, 3), r"\(N, H, W, 4\)"),
                                           ((1, 40, 32, 4), "multiples of 16")])
def test_bad_network_input(shape, message):
  with pytest.raises(ValueError, match=message):
    models.a2u_matting().init(jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize("name,added", [
    ("fade", {"up0", "up1", "up2", "up3"}),        # upsampling only, guided
    ("dysample", {"up0", "up1", "up2", "up3"}),    # upsampling only
    ("indexnet", {"down0", "down1", "down2", "down3"}),  # its downsampling hands the index
    ("a2u", {"down0", "down1", "down2", "down3"}),  # the paper's network: A2U's pairs
])
@pytest.mark.slow  # moved out of make test's five minutes (issue 34); make test-all runs it
def test_any_operator_of_the_family_drops_into_the_network(name, added):
  x = jax.ShapeDtypeStruct((1, 64, 96, 4), jnp.float32)
  model = models.MattingNet(resampler=name)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  out = jax.eval_shape(model.apply, variables, x)
  chex.assert_shape(out, (1, 64, 96, 1))
  baseline = jax.eval_shape(models.baseline_matting().init, jax.random.key(0), x)
  assert set(variables["params"]) - set(baseline["params"]) == added
  # Everything else is the baseline network, parameter for parameter.
  shared = {k: v for k, v in variables["params"].items() if k not in added}
  assert (jax.tree.map(lambda v: v.shape, shared)
          == jax.tree.map(lambda v: v.shape, baseline["params"]))
