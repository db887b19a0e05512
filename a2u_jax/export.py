"""A model checkpoint as a serialized `jax.export` artifact, for serving (a2u-export).

    python -m a2u_jax.export --checkpoint runs/a2u/model --out serving/a2u.jaxexport

The artifact is the eval-mode network with its weights as constants, between the input
encoding and the output decoding of `a2u_jax.inputs`, lowered to StableHLO with a symbolic
batch, height and width (`jax.export`, shape polymorphism):

    image   float32 (B, H, W, 3), RGB in [0, 1] (8-bit values / 255), NHWC
    trimap  uint8   (B, H, W, 1), 0 (background), 128 (unknown) or 255 (foreground)
    ->
    alpha   float32 (B, H, W, 1) in [0, 1]; 0 where the trimap is 0, 1 where it is 255

with H and W multiples of 16 (the caller pads, as `a2u_jax.predict` does: reflect-pad the
bottom and right, crop the alpha back). It is `predict.Predictor`'s computation, so
another JAX program runs it with ``jax.export.deserialize(data).call(image, trimap)``
without this code, Flax or the checkpoint; ``a2u-predict --exported FILE`` does. Beside it,
FILE.json describes it: the inputs and output, the platforms it was lowered for, the model
options and checkpoint it came from, and the artifact's SHA-256.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import secrets
import sys
import tempfile
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.interpreters.mlir
import jax.numpy as jnp

from a2u_jax import checkpointing, inputs, resamplers
from data_pipeline.files import NETWORK_STRIDE

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
# The description's layout; `load_exported` refuses other versions.
FORMAT_VERSION = 1


def description_path(path: str | os.PathLike) -> pathlib.Path:
  """Where the JSON description of the artifact at `path` lies: FILE.json beside FILE."""
  path = pathlib.Path(path)
  return path.with_name(path.name + ".json")


# -------------------------------------------------------------------------- export


def serving_function(model, variables: Mapping[str, Any]) -> Callable:
  """(image, trimap) -> alpha, the computation the artifact holds (`predict.Predictor`'s,
  with `variables` as constants); shapes and dtypes as in the module docstring."""
  def alpha(image: jax.Array, trimap: jax.Array) -> jax.Array:
    prediction = model.apply(variables, inputs.model_inputs(image, trimap), train=False)
    return inputs.postprocess_alpha(prediction, trimap)

  return alpha


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  """`platforms` as a tuple, or ValueError naming those not in `PLATFORMS`."""
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f"platforms: {', '.join(unknown) or 'none given'}; choose from "
                     f"{', '.join(PLATFORMS)}")
  return tuple(platforms)


def export_model(model, variables: Mapping[str, Any],
                 platforms: Sequence[str] = DEFAULT_PLATFORMS) -> jax.export.Exported:
  """`serving_function(model, variables)` lowered for `platforms` (any of `PLATFORMS`;
  lowering needs none of their devices) with batch, height and width symbolic: inputs
  (batch, 16*h, 16*w, 3) float32 and (batch, 16*h, 16*w, 1) uint8."""
  platforms = check_platforms(platforms)
  batch, h, w = jax.export.symbolic_shape("batch, h, w")
  height, width = NETWORK_STRIDE * h, NETWORK_STRIDE * w
  specs = (jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32),
           jax.ShapeDtypeStruct((batch, height, width, 1), jnp.uint8))
  return jax.export.export(jax.jit(serving_function(model, variables)),
                           platforms=platforms)(*specs)


def _model_options(model) -> dict[str, Any]:
  """The network's attributes (what `models.build_model` takes), as JSON values."""
  options = {name: getattr(model, name) for name in resamplers.module_attributes(type(model))}
  return json.loads(json.dumps(options, default=lambda v: dict(v) if isinstance(v, Mapping)
                               else str(v)))


def _signature(exported: jax.export.Exported) -> list[dict[str, Any]]:
  """The shape (symbolic dimensions as text) and dtype of each input, then the output."""
  return [{"shape": [str(d) for d in aval.shape], "dtype": str(aval.dtype)}
          for aval in exported.in_avals + exported.out_avals]


# What `export_model` makes: image and trimap in, alpha out.
SIGNATURE = [{"shape": ["batch", f"{NETWORK_STRIDE}*h", f"{NETWORK_STRIDE}*w", str(channels)],
              "dtype": dtype} for channels, dtype in ((3, "float32"), (1, "uint8"),
                                                      (1, "float32"))]


def describe(exported: jax.export.Exported, model, checkpoint: str | os.PathLike
             ) -> dict[str, Any]:
  """The JSON description of an artifact of `export_model` (without the file's name and
  digest, which `save_exported` adds)."""
  image, trimap, alpha = _signature(exported)
  return {
      "format_version": FORMAT_VERSION,
      "jax_version": jax.__version__,
      "calling_convention_version": exported.calling_convention_version,
      "platforms": list(exported.platforms),
      "inputs": [
          {"name": "image", **image, "range": [0.0, 1.0],
           "layout": "NHWC RGB, 8-bit values / 255"},
          {"name": "trimap", **trimap, "values": [0, 128, 255],
           "layout": "NHWC; 0 background, 128 unknown, 255 foreground"}],
      "output": {"name": "alpha", **alpha, "range": [0.0, 1.0],
                 "layout": "NHWC; clipped, 0 where the trimap is 0 and 1 where it is 255"},
      "height_width_multiple": NETWORK_STRIDE,
      "padding": (f"reflect-pad image and trimap at the bottom and right to multiples of "
                  f"{NETWORK_STRIDE}, crop the alpha back"),
      "model": _model_options(model),
      "checkpoint": str(pathlib.Path(checkpoint).absolute()),
  }


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
  """Writes through a temporary sibling and a rename: `path` is never half-written. The
  file gets the mode open() gives, 0666 less the umask (mkstemp's are 0600 whatever the
  umask, which a serving account or a teammate could not read)."""
  staging = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
  handle = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(handle, "wb") as file:
      file.write(data)
    os.replace(staging, path)
  except BaseException:
    staging.unlink(missing_ok=True)
    raise


def _refuse_to_overwrite(path: pathlib.Path, force: bool) -> None:
  existing = [str(p) for p in (path, description_path(path)) if p.exists()]
  if existing and not force:
    raise FileExistsError(f"{' and '.join(existing)} {'exist' if existing[1:] else 'exists'}; "
                          f"pass force=True (--force) to replace")


def save_exported(path: str | os.PathLike, exported: jax.export.Exported,
                  description: dict[str, Any], *, force: bool = False) -> pathlib.Path:
  """Writes the serialized artifact to `path` and its description (with the file's name
  and SHA-256) to `description_path(path)`, each atomically. Existing files are refused
  unless `force`. A crash between the two leaves a pair that `load_exported` refuses (a
  missing description, or one whose digest differs)."""
  path = pathlib.Path(path).absolute()
  _refuse_to_overwrite(path, force)
  data = bytes(exported.serialize())
  description = {**description, "artifact": path.name,
                 "sha256": hashlib.sha256(data).hexdigest()}
  path.parent.mkdir(parents=True, exist_ok=True)
  _write_atomically(path, data)
  _write_atomically(description_path(path), (json.dumps(description, indent=2) + "\n").encode())
  return path


def load_exported(path: str | os.PathLike) -> tuple[jax.export.Exported, dict[str, Any]]:
  """(artifact, description) of a file written by `save_exported`, after checking that
  the description is one this version reads and that it belongs to the file, and that
  this JAX reads the artifact whole. FileNotFoundError or ValueError, in one line naming
  the file, otherwise (missing, damaged, incompatible: export the model again)."""
  path = pathlib.Path(path)
  json_path = description_path(path)
  for needed in (path, json_path):
    if not needed.is_file():
      raise FileNotFoundError(f"{needed}: not found (a2u-export writes {path.name} and "
                              f"{json_path.name} side by side)")
  try:
    description = json.loads(json_path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{json_path}: not valid JSON ({error})") from None
  version = description.get("format_version") if isinstance(description, dict) else None
  if version != FORMAT_VERSION:
    raise ValueError(f"{json_path}: format_version {version!r} is not one this a2u-jax reads "
                     f"({FORMAT_VERSION}); export the model again")
  data = path.read_bytes()
  if hashlib.sha256(data).hexdigest() != description.get("sha256"):
    raise ValueError(f"{path}: its SHA-256 is not the one {json_path.name} records (a "
                     f"different or interrupted export); export the model again")
  return _deserialize(path, data), description


def _deserialize(path: pathlib.Path, data: bytes) -> jax.export.Exported:
  """The artifact in `data`, read whole: its StableHLO is parsed here (`deserialize`
  leaves that to the first call) and its signature checked. ValueError, in one line
  naming `path`, for one this JAX cannot read (damaged, or from an incompatible JAX);
  what MLIR prints about it on stderr is dropped."""
  def refuse(reason: str) -> ValueError:
    return ValueError(f"{path}: damaged, or written by a JAX this one ({jax.__version__}) "
                      f"cannot run ({reason}); export the model again")

  try:
    with _stderr_dropped_on_failure(), jax.interpreters.mlir.make_ir_context():
      exported = jax.export.deserialize(bytearray(data))
      exported.mlir_module(serialized=False)  # parsed only, not printed (~5x faster)
  except Exception as error:  # struct.error, TypeError, XLA's runtime error, ...
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    raise refuse(lines[0][:200] if lines else type(error).__name__) from None
  version = exported.calling_convention_version
  supported = (jax.export.minimum_supported_calling_convention_version,
               jax.export.maximum_supported_calling_convention_version)
  if not supported[0] <= version <= supported[1]:
    raise refuse(f"calling convention version {version}, not {supported[0]} to "
                 f"{supported[1]}")
  if _signature(exported) != SIGNATURE:
    raise refuse(f"its inputs and output are {_signature(exported)}, not a2u-export's "
                 f"{SIGNATURE}")
  return exported


@contextlib.contextmanager
def _stderr_dropped_on_failure() -> Iterator[None]:
  """Holds what is written to file descriptor 2 (C++ libraries write there, not to
  sys.stderr) in a temporary file: replayed if the block succeeds, dropped if it raises."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    except BaseException:
      held.truncate(0)
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      os.write(2, held.read())


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, type=pathlib.Path,
                      help="model checkpoint folder (train.py's WORKDIR/model or best_model, "
                           "or a2u-convert's output)")
  parser.add_argument("--out", required=True, type=pathlib.Path,
                      help="the artifact to write; its description goes to OUT.json")
  parser.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                      help=f"comma-separated platforms to lower for, of {', '.join(PLATFORMS)} "
                           f"(default: %(default)s); none of their devices is needed")
  parser.add_argument("--force", action="store_true", help="replace an existing --out")
  args = parser.parse_args(argv)
  try:
    platforms = check_platforms([p.strip() for p in args.platforms.split(",") if p.strip()])
    if args.out.is_dir():
      raise ValueError(f"--out {args.out}: is a folder; give the artifact's file name")
    _refuse_to_overwrite(args.out, args.force)  # before loading and lowering the network
    model, variables = checkpointing.load_model_checkpoint(args.checkpoint)
    exported = export_model(model, variables, platforms)
    out = save_exported(args.out, exported, describe(exported, model, args.checkpoint),
                        force=args.force)
  except (ValueError, FileNotFoundError, FileExistsError) as error:
    sys.exit(f"error: {error}")
  print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, for {', '.join(platforms)}) and "
        f"{description_path(out).name}")


if __name__ == "__main__":
  main()
