"""Writes the PyTorch checkpoints that tests/test_pth.py reads back without PyTorch.

    pip install torch          # the CPU build; only to remake these files
    python tests/data/pth/make_pth.py

Every object is saved in both of torch.save's formats: NAME_zip.pth (the default since
PyTorch 1.6) and NAME_legacy.pth (``_use_new_zipfile_serialization=False``, the format of
PyTorch <= 1.5, which the authors' 1.3.1 wrote). The files:

- checkpoint_*.pth: what the authors' trainval.py saves ({"state_dict", "optimizer",
  "epoch", "train_loss", "val_loss", "measure"}, the measures NumPy float64 means). Its
  state dict is a small module's (so it has `_metadata` and an int64 num_batches_tracked)
  plus float64, float16, bfloat16, int64 and bool tensors, float32 specials (signed zeros,
  infinities, a NaN, a subnormal) and views of one storage: a transpose, an offset slice,
  an expanded (stride 0) column, a 0-d element, an empty slice and a lazily negated row
  (PyTorch's negative bit).
- whole_model_zip.pth: a pickled nn.Module (not a state dict), which the reader must refuse
  (zip only: the legacy format would also carry PyTorch's source of the module classes).
- expected.npz: every tensor of the checkpoint as ``tensor.numpy()`` gave it, under
  "state_dict/KEY" and "optimizer/state/INDEX/NAME" (bfloat16, which NumPy lacks, as its
  uint16 bit patterns).
- expected.json: the checkpoint's other values (the state dict's `_metadata`, the epoch,
  the losses, the measures and the optimizer's param_groups) and each tensor's dtype.
"""

import json
import pathlib

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent


def _state_dict() -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
  """A small module's state dict (an OrderedDict with `_metadata`) plus the extra tensors,
  and the module."""
  module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  module(torch.randn(2, 3, 5, 5))  # one training-mode pass moves the running statistics
  state = module.state_dict()
  base = torch.randn(4, 6)
  state["extra.float64"] = torch.randn(2, 3, dtype=torch.float64)
  state["extra.float16"] = torch.randn(5).half()
  state["extra.bfloat16"] = torch.randn(5).bfloat16()
  state["extra.int64"] = torch.arange(-3, 3).reshape(2, 3)
  state["extra.bool"] = torch.tensor([True, False, True])
  state["extra.specials"] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"),
                                          float("nan"), 1e-45])
  state["view.base"] = base
  state["view.transposed"] = base.t()              # stride (1, 6)
  state["view.offset"] = base[1:, 2:5]             # storage offset 8, stride (6, 1)
  state["view.expanded"] = base[:, :1].expand(4, 3)  # stride (6, 0)
  state["view.element"] = base[2, 3]               # 0-d, storage offset 15
  state["view.empty"] = base[:0]
  state["view.negated"] = torch._neg_view(base[3])  # saved as base[3] and a negative bit
  return state, module


def _checkpoint() -> dict:
  """The authors' trainval.py checkpoint layout after one optimiser step."""
  state, module = _state_dict()
  optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
  module(torch.randn(2, 3, 5, 5)).square().mean().backward()
  optimizer.step()
  sad = [np.mean([41.5, 40.25]), np.mean([39.0, 38.5])]   # NumPy float64, as the authors'
  return {"state_dict": state, "optimizer": optimizer.state_dict(), "epoch": 7,
          "train_loss": {"running_loss": [0.5, 0.25], "epoch_loss": [0.375]},
          "val_loss": {"running_loss": [], "epoch_loss": sad},
          "measure": {"sad": sad, "mse": [0.0125], "grad": [], "conn": []}}


def _numpy(tensor: torch.Tensor) -> np.ndarray:
  tensor = tensor.resolve_neg()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(np.uint16)
  return tensor.numpy()


def main() -> None:
  torch.manual_seed(0)
  checkpoint = _checkpoint()
  torch.save(checkpoint, HERE / "checkpoint_zip.pth")
  torch.save(checkpoint, HERE / "checkpoint_legacy.pth", _use_new_zipfile_serialization=False)
  torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 1, 1)), HERE / "whole_model_zip.pth")

  tensors = {f"state_dict/{key}": value for key, value in checkpoint["state_dict"].items()}
  for index, slots in checkpoint["optimizer"]["state"].items():
    tensors.update({f"optimizer/state/{index}/{name}": value for name, value in slots.items()})
  np.savez(HERE / "expected.npz", **{key: _numpy(value) for key, value in tensors.items()})
  expected = {
      "metadata": dict(checkpoint["state_dict"]._metadata),
      "dtypes": {key: str(value.dtype).removeprefix("torch.") for key, value in tensors.items()},
      "param_groups": checkpoint["optimizer"]["param_groups"],
      **{key: checkpoint[key] for key in ("epoch", "train_loss", "val_loss", "measure")},
  }
  (HERE / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
  main()
