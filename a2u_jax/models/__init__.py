"""Matting networks: `a2u_matting` (the paper's model) and `baseline_matting`."""

from a2u_jax.models.matting import RESAMPLERS, MattingNet, a2u_matting, baseline_matting

__all__ = ["RESAMPLERS", "MattingNet", "a2u_matting", "baseline_matting"]
