"""Matting-network inference: our jitted model beside the authors' architecture in PyTorch.

    python benchmarks/network.py [--repeats 3] [--sizes 512 1024] [--batch8]

Rows per input size: a2u_jax A2U network (float32, bfloat16), a2u_jax baseline network
(stride-2 / bilinear, float32, bfloat16), and a PyTorch eval-mode transcription of the
authors' model (their module and parameter names, their InPlaceABN semantics, the
reassembly written with F.unfold since their CUDA kernels cannot run on CPU; "skipped"
without torch). All run the same randomised weights; the PyTorch output is checked against
ours before timing. Columns: best-of-N time, compile time, XLA's peak temporary memory.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from a2u_jax import convert, models

try:
  import torch
  import torch.nn as tnn
  import torch.nn.functional as F
except ImportError:  # The PyTorch rows are optional.
  torch = None


# --------------------------------------------------------- PyTorch transcription

if torch is not None:

  class ABN(tnn.Module):
    """InPlaceABN: BN with |weight| + eps, then LeakyReLU(0.01) if active (batch statistics
    in train mode, running ones in eval mode)."""

    def __init__(self, channels: int, activation: bool = True):
      super().__init__()
      self.weight = tnn.Parameter(torch.ones(channels))
      self.bias = tnn.Parameter(torch.zeros(channels))
      self.register_buffer("running_mean", torch.zeros(channels))
      self.register_buffer("running_var", torch.ones(channels))
      self.register_buffer("num_batches_tracked", torch.tensor(0))
      self.activation = activation

    def forward(self, x):
      x = F.batch_norm(x, self.running_mean, self.running_var, self.weight.abs() + 1e-5,
                       self.bias, self.training, 0.1, 1e-5)
      return F.leaky_relu(x, 0.01) if self.activation else x

  def conv_abn(cin, cout, k, *, dilation=1, groups=1, activation=True):
    return tnn.Sequential(tnn.Conv2d(cin, cout, k, padding=dilation * (k // 2),
                                     dilation=dilation, groups=groups, bias=False),
                          ABN(cout, activation))

  class InterChannelUpDown(tnn.Module):
    """The authors' kernel generator (share/unshare, rank 1, one group), batched."""

    def __init__(self, c, share=True, s=3, k=6):
      super().__init__()
      self.s, self.k, self.share = s, k, share
      self.bnu = tnn.Sequential(tnn.GroupNorm(32, c), tnn.LeakyReLU())
      self.bnv = tnn.Sequential(tnn.GroupNorm(32, c), tnn.LeakyReLU())
      taps = (2 * s)**2
      self.bconv_UP = tnn.Sequential(tnn.AdaptiveAvgPool2d(1), tnn.Conv2d(c, taps, 1))
      self.bconv_DP = tnn.Sequential(tnn.AdaptiveAvgPool2d(1), tnn.Conv2d(c, taps, 1))
      banks = 1 if share else c
      self.bconv_U = tnn.Sequential(tnn.AdaptiveAvgPool2d(k), tnn.Conv2d(c, banks, 1))
      self.bconv_V = tnn.Sequential(tnn.AdaptiveAvgPool2d(k), tnn.Conv2d(c, banks, 1))

    def _encode(self, x, bank):
      n, c, h, w = x.shape
      kernels = bank(x).expand(n, c, self.k, self.k).reshape(n * c, 1, self.k, self.k)
      out = F.conv2d(x.reshape(1, n * c, h, w), kernels, stride=2, padding=(self.k - 1) // 2,
                     groups=n * c)
      return out.reshape(n, c, h // 2, w // 2)

    def forward(self, x):
      n, c, h, w = x.shape
      u = self.bnu(self._encode(x, self.bconv_U))
      v = self.bnv(self._encode(x, self.bconv_V))
      affinity = (u * v).sum(1, keepdim=True) / math.sqrt(c)
      up = affinity * self.bconv_UP(x)          # rank 1: the mixing is a per-sample scale
      down = affinity * self.bconv_DP(x)
      up = F.pixel_shuffle(up, 2)
      up = F.softmax(torch.sigmoid(up), dim=1)
      return F.softmax(down, dim=1), up

  def unfold_up(x, kernels, k):
    n, c, h, w = x.shape
    patches = F.unfold(x, k, padding=(k - 1) // 2).view(n, c * k * k, h, w)
    patches = F.interpolate(patches, scale_factor=2, mode="nearest")
    return (patches.view(n, c, k * k, 2 * h, 2 * w) * kernels.unsqueeze(1)).sum(2)

  def unfold_down(x, kernels, k):
    n, c, h, w = x.shape
    patches = F.unfold(x, k, padding=(k - 2) // 2, stride=2)
    return (patches.view(n, c, k * k, h // 2, w // 2) * kernels.unsqueeze(1)).sum(2)

  class Block(tnn.Module):
    """Residual block with the authors' names (convs.* or dep_sep_conv.*, proj_*)."""

    def __init__(self, cin, cout, inner="convs"):
      super().__init__()
      self.inner = inner
      setattr(self, inner, tnn.Sequential())
      body = getattr(self, inner)
      body.add_module("conv1", tnn.Conv2d(cin, cout, 3, padding=1, bias=False))
      body.add_module("bn1", ABN(cout))
      body.add_module("conv2", tnn.Conv2d(cout, cout, 3, padding=1, bias=False))
      body.add_module("bn2", ABN(cout, activation=False))
      if cin != cout:
        self.proj_conv = tnn.Conv2d(cin, cout, 1, bias=False)
        self.proj_bn = ABN(cout, activation=False)

    def forward(self, x):
      residual = self.proj_bn(self.proj_conv(x)) if hasattr(self, "proj_conv") else x
      return F.leaky_relu(getattr(self, self.inner)(x) + residual, 0.01)

  class DownBlock(tnn.Module):
    """layer2_1 / layer3_1: conv, A2U down, conv, stride-2 projection shortcut."""

    def __init__(self, cin, cout, share):
      super().__init__()
      self.layer1 = tnn.Sequential()
      self.layer1.add_module("conv1", tnn.Conv2d(cin, cout, 3, padding=1, bias=False))
      self.layer1.add_module("bn1", ABN(cout))
      self.layer2 = tnn.Sequential()
      self.layer2.add_module("conv2", tnn.Conv2d(cout, cout, 3, padding=1, bias=False))
      self.layer2.add_module("bn2", ABN(cout, activation=False))
      self.bilinear = InterChannelUpDown(cout, share)
      self.proj_conv = tnn.Conv2d(cin, cout, 1, stride=2, bias=False)
      self.proj_bn = ABN(cout, activation=False)

    def forward(self, x):
      x0 = self.layer1(x)
      down, up = self.bilinear(x0)
      y = self.layer2(unfold_down(x0, down, 6))
      return F.leaky_relu(y + self.proj_bn(self.proj_conv(x)), 0.01), up

  class ASPP(tnn.Module):

    def __init__(self, c=256):
      super().__init__()
      self.aspp1 = tnn.Module()
      self.aspp1.atrous_conv = conv_abn(c, 256, 1)
      for j, d in ((2, 6), (3, 12), (4, 18)):
        branch = tnn.Module()
        branch.atrous_conv = tnn.Sequential(*conv_abn(c, c, 3, dilation=d, groups=c),
                                            *conv_abn(c, 256, 1))
        setattr(self, f"aspp{j}", branch)
      self.global_avg_pool = tnn.Sequential(tnn.AdaptiveAvgPool2d(1), *conv_abn(c, 256, 1))
      self.bottleneck_conv = conv_abn(1280, 256, 1)

    def forward(self, x):
      pooled = self.global_avg_pool(x).expand(-1, -1, x.shape[2], x.shape[3])
      branches = [getattr(self, f"aspp{j}").atrous_conv(x) for j in (1, 2, 3, 4)]
      return self.bottleneck_conv(torch.cat(branches + [pooled], 1))

  class Decoder(tnn.Module):

    def __init__(self, cin, cout):
      super().__init__()
      self.dconv = Block(cin, cout, "dep_sep_conv")
      self.dconv1 = Block(cout, cout, "dep_sep_conv")

    def forward(self, x, skip, up):
      return self.dconv1(self.dconv(unfold_up(x, up, 3) + skip))

  class TorchA2UMatting(tnn.Module):
    """The authors' ResNet34DecoderLearning (adobe.yaml), eval mode, their key names."""

    def __init__(self, share=True):
      super().__init__()
      self.layer0 = conv_abn(4, 64, 7)
      self.bilinear0 = InterChannelUpDown(64, share)
      self.bilinear1 = InterChannelUpDown(64, share)
      self.layer1 = tnn.Sequential()
      for i in range(1, 4):
        self.layer1.add_module(f"block{i}", Block(64, 64))
      self.layer2_1 = DownBlock(64, 128, share)
      self.layer2_2 = tnn.Sequential()
      self.layer3_1 = DownBlock(128, 256, share)
      self.layer3_2 = tnn.Sequential()
      for i in range(1, 4):
        self.layer2_2.add_module(f"block{i}", Block(128, 128))
        self.layer3_2.add_module(f"block{i}", Block(256, 256))
      self.dconv_pp = ASPP(256)
      self.decoder_layer4 = Decoder(256, 128)
      self.decoder_layer3 = Decoder(128, 64)
      self.decoder_layer2 = Decoder(64, 64)
      self.decoder_layer1 = Decoder(64, 32)
      self.short3 = conv_abn(128, 256, 3)
      self.short2 = conv_abn(64, 128, 3)
      self.short1 = conv_abn(64, 64, 3)
      self.short0 = conv_abn(4, 64, 3)
      self.pred = tnn.Sequential(conv_abn(32, 1, 3), tnn.Conv2d(1, 1, 3, padding=1, bias=False))

    def forward(self, x):
      l0 = self.layer0(x)
      down0, up0 = self.bilinear0(l0)
      l0p = unfold_down(l0, down0, 6)
      down1, up1 = self.bilinear1(l0p)
      l1 = self.layer1(unfold_down(l0p, down1, 6))
      l2, up2 = self.layer2_1(l1)
      l2 = self.layer2_2(l2)
      l3, up3 = self.layer3_1(l2)
      y = self.dconv_pp(self.layer3_2(l3))
      y = self.decoder_layer4(y, self.short3(l2), up3)
      y = self.decoder_layer3(y, self.short2(l1), up2)
      y = self.decoder_layer2(y, self.short1(l0p), up1)
      y = self.decoder_layer1(y, self.short0(x), up0)
      return self.pred(y)


# ----------------------------------------------------------------------- harness


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights for every official key, via our converter's layout (no files needed)."""
  model = models.a2u_matting()
  rng = np.random.default_rng(seed)
  state = {}
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 4)))
  for prefix, path, kind in convert.official_layout():
    for key, collection, leaf in convert._leaves(kind, prefix):
      target = convert._get(abstract, (collection,) + path + (leaf,))
      if target is None:
        continue
      shape = target.shape
      if kind == "conv" and leaf == "kernel":
        shape = (shape[3], shape[2], shape[0], shape[1])
      elif kind == "dense" and leaf == "kernel":
        shape = (shape[1], shape[0], 1, 1)
      scale = 1.0 / math.sqrt(max(1, int(np.prod(shape[1:]))))
      if leaf == "var":
        state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
      else:
        state[key] = (rng.normal(size=shape) * (scale if leaf == "kernel" else 0.1)
                      ).astype(np.float32)
  return state


def best_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def jax_row(name, model, variables, x, dtype, repeats):
  variables = jax.tree.map(lambda a: jnp.asarray(a), variables)
  inputs = jnp.asarray(x, dtype)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  start = time.perf_counter()
  compiled = apply.lower(variables, inputs).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(variables, inputs))
  seconds = best_seconds(lambda: jax.block_until_ready(compiled(variables, inputs)), repeats)
  temp = compiled.memory_analysis().temp_size_in_bytes
  return dict(name=name, seconds=seconds, compile=compile_s, temp=temp)


def torch_row(state, x, reference, repeats):
  if torch is None:
    return dict(name="PyTorch (authors' architecture)", skipped="skipped: torch not installed")
  model = TorchA2UMatting().eval()
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()
                         if not k.endswith("num_batches_tracked")}, strict=False)
  inputs = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))
  with torch.no_grad():
    out = model(inputs).numpy().transpose(0, 2, 3, 1)
    error = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
    if error > 1e-3:
      raise AssertionError(f"PyTorch transcription disagrees with a2u_jax: rel. L2 {error}")
    seconds = best_seconds(lambda: model(inputs), repeats)
  return dict(name=f"PyTorch {torch.__version__} (authors' architecture, F.unfold)",
              seconds=seconds, compile=None, temp=None)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
  parser.add_argument("--batch8", action=argparse.BooleanOptionalAction, default=True,
                      help="also batch 8 at the first size")
  args = parser.parse_args()
  for size in args.sizes:
    if size % 16:
      parser.error(f"--sizes must be multiples of 16, got {size}")
  state = random_state_dict()
  variables = convert.from_torch_state_dict(state)
  a2u, baseline = models.a2u_matting(), models.baseline_matting()
  baseline_variables = {c: {k: v for k, v in tree.items() if not k.startswith("down")}
                        for c, tree in variables.items()}
  print(f"# Network inference: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}, torch {torch.__version__ if torch else 'not installed'}")
  cases = [(1, s) for s in args.sizes] + ([(8, args.sizes[0])] if args.batch8 else [])
  rng = np.random.default_rng(0)
  for batch, size in cases:
    x = rng.normal(size=(batch, size, size, 4)).astype(np.float32)
    x[..., 3] = rng.choice([0.0, 0.5, 1.0], size=(batch, size, size))
    rows = [jax_row("a2u_jax A2U float32", a2u, variables, x, jnp.float32, args.repeats),
            jax_row("a2u_jax A2U bfloat16", models.a2u_matting(dtype=jnp.bfloat16), variables,
                    x, jnp.bfloat16, args.repeats),
            jax_row("a2u_jax baseline float32", baseline, baseline_variables, x, jnp.float32,
                    args.repeats),
            jax_row("a2u_jax baseline bfloat16", models.baseline_matting(dtype=jnp.bfloat16),
                    baseline_variables, x, jnp.bfloat16, args.repeats)]
    reference = np.asarray(jax.jit(a2u.apply)(variables, x))
    rows.append(torch_row(state, x, reference, args.repeats))
    a2u_f32, base_f32 = rows[0]["seconds"], rows[2]["seconds"]
    print(f"\n### batch {batch}, {size}x{size}\n")
    print("| model | time s | vs PyTorch | vs baseline f32 | compile s | XLA temp MB |")
    print("|---|---:|---:|---:|---:|---:|")
    torch_seconds = rows[-1].get("seconds")
    for row in rows:
      if "skipped" in row:
        print(f"| {row['name']} | {row['skipped']} | | | | |")
        continue
      speedup = f"{torch_seconds / row['seconds']:.1f}x faster" if torch_seconds else "-"
      compile_s = "-" if row["compile"] is None else f"{row['compile']:.1f}"
      temp = "-" if row["temp"] is None else f"{row['temp'] / 1e6:.0f}"
      print(f"| {row['name']} | {row['seconds']:.3f} | {speedup} "
            f"| {row['seconds'] / base_f32:.2f} | {compile_s} | {temp} |")
    print(f"\nA2U / baseline (float32): {a2u_f32 / base_f32:.2f}x")


if __name__ == "__main__":
  main()
