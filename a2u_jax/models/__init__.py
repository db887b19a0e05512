"""Matting networks: `a2u_matting` (the paper's model), `baseline_matting`, and
`build_model` (a network from its model.json options)."""

from a2u_jax.models.matting import (RESAMPLERS, MattingNet, a2u_matting, baseline_matting,
                                    build_model)

__all__ = ["RESAMPLERS", "MattingNet", "a2u_matting", "baseline_matting", "build_model"]
