"""Noise schedules: the checkpoint's scheduler config, betas, alphas_cumprod, timestep spacings and
sigma schedules, as pure functions.

Sigma is the variance-exploding noise level of a discrete DDPM timestep,
sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]), so x_ve = x_vp * sqrt(1 + sigma^2)
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Every formula here reproduces the one in diffusers 0.42's schedulers (same float32/float64 steps),
because sdlite's images must match diffusers' for the same seed. Where the schedulers disagree with
each other (e.g. "linspace" is rounded for DDIM/PNDM but fractional for Euler, DPM-Solver spaces
steps+1 points) the function says which scheduler it follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

SCHEDULER_CLASSES = (
    "PNDMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Constructor defaults of the keys whose default differs between diffusers' scheduler classes.
# A key missing from scheduler_config.json takes the default of the class the sampler uses:
# `XScheduler.from_config(pipe.scheduler.config)` drops the keys the first class only defaulted
# (its config's `_use_default_values`).
CLASS_DEFAULTS = {
    "PNDMScheduler": dict(timestep_spacing="leading", set_alpha_to_one=False),
    "DDIMScheduler": dict(timestep_spacing="leading", set_alpha_to_one=True, clip_sample=True),
    "EulerDiscreteScheduler": dict(timestep_spacing="linspace", use_karras_sigmas=False),
    "EulerAncestralDiscreteScheduler": dict(timestep_spacing="linspace"),
    "DPMSolverMultistepScheduler": dict(timestep_spacing="linspace", use_karras_sigmas=False),
}

# Keys we accept only with the value sdlite implements: key -> (allowed values, what to do instead).
_ONLY = {
    "trained_betas": ((None,), "explicit trained_betas are not supported; use beta_schedule"),
    "thresholding": ((False, None), "dynamic thresholding is not implemented"),
    "use_exponential_sigmas": ((False, None), "exponential sigmas are not implemented"),
    "use_beta_sigmas": ((False, None), "beta sigmas are not implemented"),
    "use_lu_lambdas": ((False, None), "Lu lambdas are not implemented"),
    "use_flow_sigmas": ((False, None), "flow-matching sigmas are not implemented"),
    "use_dynamic_shifting": ((False, None), "dynamic shifting is not implemented"),
    "algorithm_type": (("dpmsolver++", None), "only DPM-Solver++ is implemented"),
    "solver_order": ((2, None), "only second-order DPM-Solver++ is implemented"),
    "solver_type": (("midpoint", None), "only the midpoint DPM-Solver++ variant is implemented"),
    "final_sigmas_type": (("zero", None), "only final_sigmas_type='zero' is implemented"),
    "euler_at_final": ((False, None), "euler_at_final is not implemented"),
    "interpolation_type": (("linear", None), "only linear sigma interpolation is implemented"),
    "timestep_type": (("discrete", None), "only discrete timesteps are implemented"),
    "sigma_min": ((None,), "a custom sigma_min is not implemented"),
    "sigma_max": ((None,), "a custom sigma_max is not implemented"),
    "variance_type": ((None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
                      "learned variance is not implemented"),
    "lambda_min_clipped": ((-math.inf, None), "lambda_min_clipped is not implemented"),
}
# Of those, DPMSolverMultistepScheduler's own settings: other classes use some of the same names for
# theirs (UniPC's solver_type "bh2", DEIS's algorithm_type "deis"), which no sdlite sampler reads,
# so there they are not checked.
DPM_SOLVER_KEYS = {"algorithm_type", "solver_order", "solver_type", "final_sigmas_type", "euler_at_final",
                   "lambda_min_clipped", "use_lu_lambdas"}


@dataclass(frozen=True)
class ScheduleConfig:
    """A checkpoint's scheduler_config.json, as far as sdlite uses it (diffusers' names)."""

    num_train_timesteps: int = 1000  # T: number of DDPM training timesteps
    beta_start: float = 0.0001  # beta at t=0 (diffusers' default; SD uses 0.00085)
    beta_end: float = 0.02  # beta at t=T-1 (SD uses 0.012)
    beta_schedule: str = "linear"  # "linear" | "scaled_linear" (SD) | "squaredcos_cap_v2"
    prediction_type: str = "epsilon"  # what the network predicts: "epsilon" | "v_prediction"
    steps_offset: int = 0  # added to "leading" timesteps (SD: 1)
    rescale_betas_zero_snr: bool = False  # rescale betas to zero terminal SNR (Lin et al. 2023)
    clip_sample_range: float = 1.0  # DDIM's x0 clamp range when clip_sample
    scheduler_class: str | None = None  # the json's _class_name, picks the default sampler
    # Class-dependent keys: None means "not in the json", read them with `setting`.
    timestep_spacing: str | None = None  # "leading" | "trailing" | "linspace"
    set_alpha_to_one: bool | None = None  # DDIM/PNDM: the last step ends at alpha=1 (sigma 0)
    clip_sample: bool | None = None  # DDIM: clamp predicted x0 to +-clip_sample_range
    use_karras_sigmas: bool | None = None  # Euler / DPM-Solver: Karras et al. sigma spacing

    @classmethod
    def from_json(cls, d: dict) -> "ScheduleConfig":
        """Build from a scheduler_config.json dict; unknown keys are ignored.

        Raises ValueError for values sdlite does not implement (trained_betas, thresholding, an
        unknown prediction_type / beta_schedule / timestep_spacing, other DPM-Solver variants...).
        An in-memory diffusers config (`pipe.scheduler.config`) works too: the keys it lists in
        `_use_default_values` count as absent, as in diffusers' from_config.
        """
        defaulted = set(d.get("_use_default_values", ()))
        d = {k: v for k, v in d.items() if k not in defaulted}
        dpm_solver = d.get("_class_name", "DPMSolverMultistepScheduler") == "DPMSolverMultistepScheduler"
        for key, (allowed, why) in _ONLY.items():
            if key in d and d[key] not in allowed and (dpm_solver or key not in DPM_SOLVER_KEYS):
                raise ValueError(f"scheduler config {key}={d[key]!r}: {why}")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        if "_class_name" in d:
            kwargs["scheduler_class"] = d["_class_name"]
        config = cls(**kwargs)
        checks = [
            ("prediction_type", PREDICTION_TYPES),
            ("beta_schedule", BETA_SCHEDULES),
            ("timestep_spacing", TIMESTEP_SPACINGS + (None,)),
        ]
        for key, allowed in checks:
            if getattr(config, key) not in allowed:
                raise ValueError(
                    f"scheduler config {key}={getattr(config, key)!r} is not supported; "
                    f"use one of {[a for a in allowed if a is not None]}"
                )
        return config

    def setting(self, name: str, scheduler_class: str):
        """The value diffusers' `scheduler_class.from_config(checkpoint config)` would use."""
        value = getattr(self, name)
        return CLASS_DEFAULTS[scheduler_class].get(name) if value is None else value


def betas(config: ScheduleConfig) -> torch.Tensor:
    """The DDPM betas (T,), float32, after zero-terminal-SNR rescaling if the config asks."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        b = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        b = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":
        b = cosine_betas(n)
    else:
        raise ValueError(f"unknown beta_schedule {config.beta_schedule!r}")
    return rescale_zero_terminal_snr(b) if config.rescale_betas_zero_snr else b


def cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas capped at max_beta."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    out = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(out, dtype=torch.float32)


def rescale_zero_terminal_snr(b: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last timestep has SNR 0 (Lin et al. 2023, Alg. 1)."""
    sqrt_ac = torch.cumprod(1.0 - b, dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = torch.cat([ac[0:1], ac[1:] / ac[:-1]])
    return 1 - alphas


def alphas_cumprod(config: ScheduleConfig, *, clamp_zero_snr: bool = False) -> torch.Tensor:
    """alpha_bar_t (T,), float32. With zero terminal SNR alpha_bar[-1] is 0 (sigma infinite); the
    Euler and DPM-Solver schedulers replace it by 2**-24 (sigma ~4096): pass clamp_zero_snr=True."""
    ac = torch.cumprod(1.0 - betas(config), dim=0)
    if clamp_zero_snr and config.rescale_betas_zero_snr:
        ac[-1] = 2**-24
    return ac


def sigmas_from_alphas_cumprod(ac: torch.Tensor) -> torch.Tensor:
    """VE sigma of each training timestep, in ascending t (float32, like diffusers)."""
    return ((1 - ac) / ac) ** 0.5


def spaced_timesteps(
    spacing: str, steps: int, num_train_timesteps: int, steps_offset: int = 0, *, rounded: bool = True
) -> np.ndarray:
    """Descending inference timesteps (float64) as DDIM/PNDM/Euler's set_timesteps choose them.

    "leading": multiples of T // steps plus steps_offset; "trailing": round(T - k*T/steps) - 1;
    "linspace": linspace(0, T-1, steps), rounded for DDIM/PNDM (rounded=True), fractional for the
    Euler schedulers (rounded=False). See Lin et al. 2023, Table 2.
    """
    T = num_train_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps, dtype=np.float32 if not rounded else np.float64)
        ts = ts.round() if rounded else ts
        return ts[::-1].astype(np.float64)
    if spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.float64)
        return ts + steps_offset
    if spacing == "trailing":
        # [:steps]: for 62 step counts up to 1000 (61, 103, ...) float rounding gives arange one
        # more point, a timestep of -1; diffusers runs that extra step, sdlite does not.
        return np.round(np.arange(T, 0, -T / steps)[:steps]).astype(np.float64) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}; use one of {TIMESTEP_SPACINGS}")


def dpm_solver_timesteps(spacing: str, steps: int, num_train_timesteps: int, steps_offset: int = 0) -> np.ndarray:
    """Descending int64 timesteps as DPMSolverMultistepScheduler.set_timesteps chooses them: it spaces
    steps+1 points and drops the lowest for "linspace" and "leading"."""
    T = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ts = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1].astype(np.int64)
        return ts + steps_offset
    if spacing == "trailing":
        return np.arange(T, 0, -T / steps)[:steps].round().astype(np.int64) - 1  # [:steps]: as above
    raise ValueError(f"unknown timestep_spacing {spacing!r}; use one of {TIMESTEP_SPACINGS}")


def interp_sigmas(timesteps: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Sigma at (possibly fractional) timesteps, linear in sigma between training timesteps."""
    return np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho)
    (Karras et al. 2022, eq. 5), float64, without the final zero."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma: linear interpolation in log sigma between the two training
    timesteps around it (k-diffusion's DiscreteSchedule.sigma_to_t; diffusers' _sigma_to_t)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_train_sigmas[:, np.newaxis]  # (T, n)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_train_sigmas) - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def append_zero(x: torch.Tensor) -> torch.Tensor:
    """x with a trailing 0 (the final, noise-free sigma)."""
    return torch.cat([x, x.new_zeros([1])])


def ve_scale(sigma: torch.Tensor) -> torch.Tensor:
    """sqrt(1 + sigma^2): x_ve = x_vp * ve_scale(sigma). At sigma = inf (zero terminal SNR, DDIM's
    first step) the VE latent would be infinite, so there the sampler state is the VP latent
    itself and the scale is 1."""
    sigma = torch.as_tensor(sigma)
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), (sigma**2 + 1) ** 0.5)
