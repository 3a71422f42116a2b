"""The denoiser wrapper: a discrete-time eps- or v-prediction network as k-diffusion's D(x, sigma).

x is on the variance-exploding scale, x = x_vp * sqrt(1 + sigma^2). The network sees the
variance-preserving latent x * c_in, c_in = 1 / sqrt(1 + sigma^2), at timestep t, and
    epsilon:       D(x, sigma) = x - sigma * eps
    v_prediction:  D(x, sigma) = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)
(Karras et al. 2022, Table 1; Salimans & Ho 2022 for v), written in the operation order of
diffusers' Euler schedulers so the float32 results agree.

sigma -> t: diffusers' timesteps are not one formula of sigma ("leading" spacing adds steps_offset,
Karras schedules round or keep fractional timesteps...), so a sampling plan hands the Denoiser its
exact (sigma, t) pairs in `timestep_table`; a sigma outside it is an error.
"""

from __future__ import annotations

from typing import Callable

import torch

from .schedules import PREDICTION_TYPES, ve_scale

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_vp (B,C,H,W), t 0-dim) -> eps|v


class Denoiser:
    """D(x, sigma) around a raw network `model(x_in, t)`; also exposes the raw output for samplers
    that combine network outputs before converting them (PLMS)."""

    def __init__(
        self,
        model: ModelFn,
        prediction_type: str,
        timestep_table: dict[float, torch.Tensor] | None = None,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r}: use one of {PREDICTION_TYPES}")
        self.model = model
        self.prediction_type = prediction_type
        # float(sigma) -> t, exactly as diffusers passes it (0-dim int64 or float32 tensor)
        self.timestep_table = {} if timestep_table is None else dict(timestep_table)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep passed to the network at noise level sigma."""
        key = float(sigma)
        if key not in self.timestep_table:
            raise ValueError(f"sigma {key} is not in this plan")
        return self.timestep_table[key]

    def output(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The raw network output (eps or v) for the VE latent x at sigma."""
        return self.model(x / ve_scale(sigma), self.timestep(sigma))

    def x0_eps(self, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(denoised x0, noise eps) from a raw output `out` at (x, sigma).

        At sigma = inf (zero terminal SNR) x is the VP latent, x0 = -v and eps = x; an epsilon
        network cannot denoise there (diffusers returns NaN), so that raises."""
        if torch.isinf(sigma):
            if self.prediction_type != "v_prediction":
                raise ValueError("an epsilon-prediction model cannot denoise at zero SNR (sigma = inf)")
            return -out, x
        if self.prediction_type == "epsilon":
            return x - sigma * out, out
        x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
        return x0, (x - x0) / sigma

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x, sigma): the denoised estimate of x0."""
        return self.x0_eps(x, sigma, self.output(x, sigma))[0]
