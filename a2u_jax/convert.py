"""Conversion of the authors' PyTorch checkpoints (and torchvision ResNet-34) to Flax.

    python -m a2u_jax.convert --torch model_best.pth --out checkpoints/a2u_share [--force]

The .pth files are read without PyTorch, by `a2u_jax.pth` (either torch.save format, and
nothing but tensors, containers and numbers is built from them, in memory bounded by the
file's content); only arrays and numbers are taken as weights, and a failure is one line
naming the file (`main` exits 2 and writes nothing).

Official keys (see tests/data/reference/official_checkpoint_keys_*.json) map one to one
onto `a2u_jax.models.a2u_matting`: conv weights OIHW -> HWIO, 1x1 generator convs -> Dense
kernels, InPlaceABN weight/bias -> params scale/bias and running_mean/var -> batch_stats.
The names differ where the network goes through the resampler family: the authors' kernel
generators "bilinear0", "bilinear1", "layer2_1.bilinear" and "layer3_1.bilinear" are our
A2U down modules "down0".."down3" (each an `a2u_jax.layers.A2UDownsample`, whose
generator is "generator"), and their "bconv_U/V/UP/DP", "bnu", "bnv" are "encode_u/v",
"mix_up/down", "norm_u/v"; `official_layout` lists every pair.
"""

from __future__ import annotations

import argparse
import pathlib
import zipfile
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from a2u_jax import checkpointing, models, pth

Path = tuple[str, ...]


# ------------------------------------------------------------------------ the layout


def _generator(prefix: str, path: Path) -> Iterator[tuple[str, Path, str]]:
  for torch_name, flax_name, kind in (("bconv_U.1", "encode_u", "dense"),
                                      ("bconv_V.1", "encode_v", "dense"),
                                      ("bconv_UP.1", "mix_up", "dense"),
                                      ("bconv_DP.1", "mix_down", "dense"),
                                      ("bnu.0", "norm_u", "norm"), ("bnv.0", "norm_v", "norm")):
    yield f"{prefix}.{torch_name}", path + (flax_name,), kind


def _a2u_down(level: int) -> Path:
  """Where the network keeps the generator of its A2U down module at `level`."""
  return (f"down{level}", "generator")


def _conv_abn(conv: str, bn: str, path: Path) -> Iterator[tuple[str, Path, str]]:
  yield conv, path + ("conv",), "conv"
  yield bn, path + ("bn",), "abn"


def _basic_block(prefix: str, path: Path, convs: str = "convs"):
  yield from _conv_abn(f"{prefix}.{convs}.conv1", f"{prefix}.{convs}.bn1", path + ("conv1",))
  yield from _conv_abn(f"{prefix}.{convs}.conv2", f"{prefix}.{convs}.bn2", path + ("conv2",))
  yield from _conv_abn(f"{prefix}.proj_conv", f"{prefix}.proj_bn", path + ("proj",))


def official_layout() -> list[tuple[str, Path, str]]:
  """(torch module prefix, Flax module path, kind) for every module of the official model.

  Includes optional modules (projection shortcuts) that a given network may not have;
  `from_torch_state_dict` keeps those present in the Flax model.
  """
  entries = list(_conv_abn("layer0.0", "layer0.1", ("stem",)))
  entries += _generator("bilinear0", _a2u_down(0))
  entries += _generator("bilinear1", _a2u_down(1))
  for i in range(1, 4):
    entries += _basic_block(f"layer1.block{i}", ("layer1", f"block{i}"))
  for level in ("2", "3"):
    first = f"layer{level}_1"
    entries += _conv_abn(f"{first}.layer1.conv1", f"{first}.layer1.bn1", (first, "conv1"))
    entries += _conv_abn(f"{first}.layer2.conv2", f"{first}.layer2.bn2", (first, "conv2"))
    entries += _conv_abn(f"{first}.proj_conv", f"{first}.proj_bn", (first, "proj"))
    entries += _generator(f"{first}.bilinear", _a2u_down(int(level)))
    for i in range(1, 4):
      entries += _basic_block(f"layer{level}_2.block{i}", (f"layer{level}_2", f"block{i}"))
  aspp = "dconv_pp"
  entries += _conv_abn(f"{aspp}.aspp1.atrous_conv.0", f"{aspp}.aspp1.atrous_conv.1",
                       ("aspp", "branch1"))
  for j in (2, 3, 4):
    branch = f"{aspp}.aspp{j}.atrous_conv"
    entries += _conv_abn(f"{branch}.0", f"{branch}.1", ("aspp", f"branch{j}_dw"))
    entries += _conv_abn(f"{branch}.2", f"{branch}.3", ("aspp", f"branch{j}_pw"))
  entries += _conv_abn(f"{aspp}.global_avg_pool.1", f"{aspp}.global_avg_pool.2",
                       ("aspp", "image_pool"))
  entries += _conv_abn(f"{aspp}.bottleneck_conv.0", f"{aspp}.bottleneck_conv.1",
                       ("aspp", "project"))
  for level in range(4):
    entries += _conv_abn(f"short{level}.0", f"short{level}.1", (f"skip{level}",))
    stage = f"decoder_layer{level + 1}"
    for torch_block, flax_block in (("dconv", "block1"), ("dconv1", "block2")):
      entries += _basic_block(f"{stage}.{torch_block}", (f"stage{level + 1}", flax_block),
                              convs="dep_sep_conv")
  entries += _conv_abn("pred.0.0", "pred.0.1", ("head",))
  entries.append(("pred.1", ("head_out",), "conv"))
  return entries


# ------------------------------------------------------------------- conversion


def _weight(key: str, value: Any) -> np.ndarray:
  """`value` as a NumPy array of numbers, refused unless it is an array or a number: a
  nested list would be expanded element by element (a few hundred bytes of shared
  references in a .pth make gigabytes)."""
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().numpy()
  if isinstance(value, (np.ndarray, np.generic, jax.Array, int, float)):
    array = np.asarray(value)
    if array.dtype.kind in "biuf":
      return array
  raise ValueError(f"state dict entry {pth.describe(key)} is {pth.describe(value)}, not a weight "
                   f"(expected an array or a number)")


def _normalise_keys(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Parameter names (without DataParallel's "module.") -> weights, from a state dict or a
  checkpoint holding one under "state_dict"; ValueError (one line) for a key that is not a
  name or a value that is not a weight."""
  if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
    state_dict = state_dict["state_dict"]
  tensors = {}
  for key, value in state_dict.items():
    if not isinstance(key, str):
      raise ValueError(f"state dict key {pth.describe(key)} is not a parameter name "
                       f"(expected a string)")
    name = key[len("module."):] if key.startswith("module.") else key
    if name in tensors:
      raise ValueError(f"state dict names {pth.describe(name)} twice (with and without "
                       f"'module.')")
    tensors[name] = _weight(key, value)
  return tensors


def detect_model_config(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Model options (model.json content) of an official checkpoint, from its shapes."""
  tensors = _normalise_keys(state_dict)
  key = "bilinear0.bconv_U.1.weight"
  if key not in tensors:
    raise ValueError(f"not an A2U matting checkpoint: no {key!r} among its "
                     f"{len(tensors)} keys (first: {sorted(tensors)[:3]})")
  return {"resampler": "a2u",
          "resampler_options": {"share": tensors[key].shape[:1] == (1,)}}


def _leaves(kind: str, prefix: str) -> list[tuple[str, str, str]]:
  """(torch key, Flax collection, Flax leaf name) of one module."""
  if kind == "abn":
    return [(f"{prefix}.weight", "params", "scale"), (f"{prefix}.bias", "params", "bias"),
            (f"{prefix}.running_mean", "batch_stats", "mean"),
            (f"{prefix}.running_var", "batch_stats", "var")]
  if kind == "norm":
    return [(f"{prefix}.weight", "params", "scale"), (f"{prefix}.bias", "params", "bias")]
  if kind == "dense":
    return [(f"{prefix}.weight", "params", "kernel"), (f"{prefix}.bias", "params", "bias")]
  return [(f"{prefix}.weight", "params", "kernel")]


def _convert_leaf(kind: str, leaf: str, value: np.ndarray) -> np.ndarray | None:
  """`value` in Flax's layout, or None where it lacks torch's (OIHW; (O, C, 1, 1) dense)."""
  if leaf == "kernel" and kind == "conv":
    return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else None  # OIHW -> HWIO
  if leaf == "kernel" and kind == "dense":  # (O, C, 1, 1) -> (C, O)
    return (np.transpose(value[:, :, 0, 0], (1, 0))
            if value.ndim == 4 and value.shape[2:] == (1, 1) else None)
  return value


def _get(tree: Mapping, path: Path):
  for name in path:
    if not isinstance(tree, Mapping) or name not in tree:
      return None
    tree = tree[name]
  return tree


def _set(tree: dict, path: Path, value) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _summary(items: list[str]) -> str:
  return f"{len(items)}: {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"


def convert_into(tensors: Mapping[str, np.ndarray], target: Mapping[str, Any],
                 layout: list[tuple[str, Path, str]], *, require_all_keys: bool = True,
                 require_all_leaves: bool = True) -> dict[str, Any]:
  """Fills the variable tree shaped like `target` from `tensors` following `layout`.

  Raises ValueError listing unknown torch keys (if `require_all_keys`), Flax leaves left
  unfilled (if `require_all_leaves`) and shape mismatches.
  """
  out: dict[str, Any] = {}
  used, mismatched = set(), []
  for prefix, path, kind in layout:
    for key, collection, leaf in _leaves(kind, prefix):
      expected = _get(target, (collection,) + path + (leaf,))
      if expected is None:
        continue  # a module this network does not have (e.g. an identity shortcut)
      if key not in tensors:
        continue  # reported below as an unfilled leaf
      value = _convert_leaf(kind, leaf, tensors[key])
      used.add(key)
      if value is None or value.shape != tuple(expected.shape):
        mismatched.append(f"{key} {tensors[key].shape} -> {'/'.join(path)}/{leaf} expects "
                          f"{tuple(expected.shape)}")
        continue
      _set(out, (collection,) + path + (leaf,), value.astype(expected.dtype))
  errors = []
  if mismatched:
    errors.append(f"mis-shaped keys {_summary(mismatched)}")
  if require_all_keys:
    unknown = sorted(k for k in tensors if k not in used and not k.endswith("num_batches_tracked"))
    if unknown:
      errors.append(f"unknown keys {_summary(unknown)}")
  if require_all_leaves:
    flat_target = jax.tree_util.tree_flatten_with_path(target)[0]
    missing = ["/".join(str(getattr(p, "key", p)) for p in path)
               for path, _ in flat_target
               if _get(out, tuple(str(getattr(p, "key", p)) for p in path)) is None]
    if missing:
      errors.append(f"missing (no checkpoint key fills them) {_summary(missing)}")
  if errors:
    raise ValueError("checkpoint does not match the model: " + "; ".join(errors))
  return out


def _abstract_variables(model: models.MattingNet) -> dict[str, Any]:
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 4)))


def from_torch_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """{"params", "batch_stats"} for `a2u_matting(**detect_model_config(state_dict))`.

  Accepts names -> NumPy arrays, torch tensors or numbers (nothing else is a weight: a
  nested list is refused), with or without the "module." prefix and the outer
  "state_dict" entry. Share/unshare is detected from the shapes. Unknown,
  missing or mis-shaped keys raise ValueError listing them (first few and the count).
  """
  config = detect_model_config(state_dict)
  model = models.build_model(config)
  return convert_into(_normalise_keys(state_dict), _abstract_variables(model), official_layout())


def load_torch_checkpoint(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """The state dict of a .pth / .pth.tar checkpoint as NumPy arrays, read without torch.

  `a2u_jax.pth.read_pth` reads the file (torch.save's zip or legacy format); a checkpoint
  holding more than weights (the authors' training saves the optimizer, epoch and
  measures beside "state_dict") gives its "state_dict". A ``.npz`` file of the same names
  (optionally under "state_dict/") is read with NumPy.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: checkpoint file not found")
  if path.suffix == ".npz":
    try:
      with np.load(path) as archive:
        # bzip2 and LZMA members inflate without bound per read (np.savez_compressed deflates).
        methods = {info.compress_type for info in archive.zip.infolist()}
        if not methods <= {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}:
          raise ValueError(f"zip compression methods {sorted(methods)}: only stored and "
                           f"deflated members are read")
        loaded = {k[len("state_dict/"):] if k.startswith("state_dict/") else k: archive[k]
                  for k in archive.files if k.startswith("state_dict/") or "/" not in k}
    except Exception as error:  # EOFError, BadZipFile, pickled objects: name the file.
      raise ValueError(f"{path}: not a readable .npz archive of arrays ({type(error).__name__}: "
                       f"{error})") from None
    if not loaded:
      raise ValueError(f"{path}: the archive holds no arrays")
  else:
    loaded = pth.read_pth(path)
    if not isinstance(loaded, Mapping):
      raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got "
                       f"{type(loaded).__name__}")
  try:
    return _normalise_keys(loaded)
  except ValueError as error:
    raise ValueError(f"{path}: {error}") from None


# -------------------------------------------------------- ImageNet initialisation


def _torchvision_layout() -> list[tuple[str, Path, str]]:
  """torchvision resnet34 -> our encoder (blocks the official model has no room for unused)."""
  entries = list(_conv_abn("conv1", "bn1", ("stem",)))
  for i in range(3):
    entries += _conv_abn(f"layer1.{i}.conv1", f"layer1.{i}.bn1", ("layer1", f"block{i + 1}",
                                                                   "conv1"))
    entries += _conv_abn(f"layer1.{i}.conv2", f"layer1.{i}.bn2", ("layer1", f"block{i + 1}",
                                                                   "conv2"))
  for level in (2, 3):
    first = (f"layer{level}_1",)
    entries += _conv_abn(f"layer{level}.0.conv1", f"layer{level}.0.bn1", first + ("conv1",))
    entries += _conv_abn(f"layer{level}.0.conv2", f"layer{level}.0.bn2", first + ("conv2",))
    entries += _conv_abn(f"layer{level}.0.downsample.0", f"layer{level}.0.downsample.1",
                         first + ("proj",))
    for i in range(1, 4):
      block = (f"layer{level}_2", f"block{i}")
      entries += _conv_abn(f"layer{level}.{i}.conv1", f"layer{level}.{i}.bn1", block + ("conv1",))
      entries += _conv_abn(f"layer{level}.{i}.conv2", f"layer{level}.{i}.bn2", block + ("conv2",))
  return entries


def from_torchvision_resnet34(state_dict: Mapping[str, Any],
                              variables: Mapping[str, Any]) -> dict[str, Any]:
  """Returns `variables` with the encoder replaced by torchvision ResNet-34 weights.

  The stem's RGB filters are copied and its 4th (trimap) input channel is set to zero, as
  the authors do; layer1, layer2 (blocks 0-3) and layer3 (blocks 0-3) map onto layer1,
  layer2_1/layer2_2 and layer3_1/layer3_2. torchvision's later blocks and fc are unused.
  """
  tensors = _normalise_keys(state_dict)
  if "conv1.weight" not in tensors or tensors["conv1.weight"].shape != (64, 3, 7, 7):
    raise ValueError("not a torchvision ResNet-34 state dict: expected conv1.weight of shape "
                     f"(64, 3, 7, 7), got {tensors.get('conv1.weight', np.empty(0)).shape}")
  rgb = tensors["conv1.weight"]
  tensors["conv1.weight"] = np.concatenate([rgb, np.zeros_like(rgb[:, :1])], axis=1)
  encoder = convert_into(tensors, variables, _torchvision_layout(), require_all_keys=False,
                         require_all_leaves=False)
  merged = jax.tree.map(np.asarray, dict(variables))
  for collection, tree in encoder.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      _set(merged[collection], tuple(p.key for p in path), leaf)
  expected = sum(len(_leaves(kind, p)) for p, _, kind in _torchvision_layout())
  filled = sum(len(jax.tree.leaves(t)) for t in encoder.values())
  if filled != expected:
    raise ValueError(f"torchvision state dict filled {filled} of the {expected} encoder "
                     f"tensors; is it a ResNet-34?")
  return merged


# ------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--torch", required=True, type=pathlib.Path,
                      help="the authors' checkpoint (.pth / .pth.tar in either torch.save "
                           "format, read without PyTorch; or .npz of the same names)")
  parser.add_argument("--out", required=True, type=pathlib.Path,
                      help="output folder for the orbax checkpoint (must be empty or absent)")
  parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
  args = parser.parse_args(argv)
  try:
    state_dict = load_torch_checkpoint(args.torch)
    try:
      config = detect_model_config(state_dict)
      variables = from_torch_state_dict(state_dict)
    except ValueError as error:
      raise ValueError(f"{args.torch}: {error}") from None
    out = checkpointing.save_model_checkpoint(args.out, variables, config, force=args.force)
  except (FileNotFoundError, FileExistsError, ValueError) as error:
    # One line (parser.error would print the usage first): the file and what is wrong.
    parser.exit(2, f"{parser.prog}: error: {error}\n")
  share = config["resampler_options"]["share"]
  print(f"wrote {out} ({'share' if share else 'unshare'} A2U matting network)")


if __name__ == "__main__":
  main()
