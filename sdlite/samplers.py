"""Samplers and sampling plans.

Samplers are generators with one signature, `sample_<name>(model, x, sigmas, *, generator=None,
**options)`: `model` is a Denoiser (D(x, sigma), see denoiser.py), x the VE-scale latent at
sigmas[0]; after each step they yield x, now at the next sigma. They reproduce diffusers' schedulers
step for step (DDIM eta=0, PNDM as PLMS -- skip_prk_steps=True, as Stable Diffusion configures it --
Euler, Euler ancestral, DPM-Solver++ 2M).

`make_plan(sampler, config, steps, strength)` turns a checkpoint's ScheduleConfig into the sigmas,
timesteps and options diffusers' `XScheduler.from_config(config)` + set_timesteps (+ img2img's
get_timesteps) would use; `plan.sample(model_fn, x)` runs it. The pipeline only needs:
    x = noise * plan.init_noise_sigma          # txt2img
    x = plan.add_noise(x0_latents, noise)      # img2img
    for i, x in enumerate(plan.sample(model_fn, x, generator=g)): latents = plan.to_latents(x, i)
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from . import schedules as S
from .denoiser import Denoiser, ModelFn
from .schedules import ScheduleConfig, ve_scale


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Noise drawn as diffusers' randn_tensor draws it: on the generator's device, then moved."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _rescale(x: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """The same VP latent, re-expressed on the VE scale of another sigma."""
    if torch.equal(sigma_from, sigma_to):
        return x
    return x / ve_scale(sigma_from) * ve_scale(sigma_to)


# ---------------------------------------------------------------------------------------- samplers


# The Euler samplers step in fp32 and cast the latent back, as diffusers' Euler schedulers do (D
# itself comes in the network's dtype here): at zero terminal SNR the first sigma is 4096, and x - D
# cancels in fp16 (the bundled model's fp16 Euler image was 105/255 off its fp32 image; 3/255 with
# the step in fp32). fp32 runs are unchanged.


def sample_euler(model, x, sigmas, *, generator=None) -> Iterator[torch.Tensor]:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma
    (Karras et al. 2022, Alg. 2 without churn; diffusers' EulerDiscreteScheduler)."""
    for i in range(len(sigmas) - 1):
        sigma, x32 = sigmas[i], x.float()
        d = (x32 - model(x, sigma).float()) / sigma
        x = (x32 + d * (sigmas[i + 1] - sigma)).to(x.dtype)
        yield x


def sample_euler_ancestral(model, x, sigmas, *, generator=None) -> Iterator[torch.Tensor]:
    """Euler step down to sigma_down, then fresh noise of std sigma_up (k-diffusion's
    sample_euler_ancestral, eta=1; diffusers' EulerAncestralDiscreteScheduler). One randn per step,
    the last one included, in diffusers' order and in the latent's dtype."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, x32 = sigmas[i], sigmas[i + 1], x.float()
        denoised = model(x, sigma).float()
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x32 = x32 + (x32 - denoised) / sigma * (sigma_down - sigma)
        x = (x32 + _randn_like(x, generator) * sigma_up).to(x.dtype)
        yield x


def sample_dpmpp_2m(model, x, sigmas, *, generator=None) -> Iterator[torch.Tensor]:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; k-diffusion's sample_dpmpp_2m): second-order
    multistep in lambda = -log sigma, first order on the first step and on the step to sigma 0
    (diffusers' DPMSolverMultistepScheduler, solver_order=2, final_sigmas_type="zero")."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        h = torch.log(sigma) - torch.log(sigma_next)  # lambda_next - lambda; inf when sigma_next = 0
        if old_denoised is None or sigma_next == 0:
            d = denoised
        else:
            r = (torch.log(sigmas[i - 1]) - torch.log(sigma)) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        old_denoised = denoised
        yield x


def _ddim_transfer(x0, eps, sigma_to, sigma_next):
    """DDIM's deterministic update x_to = sqrt(a_to) x0 + sqrt(1 - a_to) eps, on the VE scale
    (x0 + sigma_to * eps), then expressed at the sigma the next step starts from."""
    return _rescale(x0 + sigma_to * eps, sigma_to, sigma_next)


def sample_ddim(model, x, sigmas, *, generator=None, targets=None, clip_x0=None) -> Iterator[torch.Tensor]:
    """DDIM with eta=0 (Song et al. 2021, eq. 12; diffusers' DDIMScheduler). On the VE scale this is
    an Euler step with the discrete sigmas. `targets[i]` is the sigma step i lands on: diffusers
    uses prev_t = t - T // steps, which for "trailing"/"linspace" spacing is not the next step's
    timestep (the next step then treats the latent as if it were at its own t); default sigmas[1:].
    `clip_x0` clamps the predicted x0 (clip_sample)."""
    targets = sigmas[1:] if targets is None else targets
    for i in range(len(sigmas) - 1):
        x0, eps = model.x0_eps(x, sigmas[i], model.output(x, sigmas[i]))
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        x = _ddim_transfer(x0, eps, targets[i], sigmas[i + 1])
        yield x


# Adams-Bashforth weights on the last 1..4 network outputs, newest first (PNDM paper, eq. 12).
_PLMS_WEIGHTS = {1: (1,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def sample_pndm(model, x, sigmas, *, generator=None, transfers=None) -> Iterator[torch.Tensor]:
    """PLMS, the pseudo linear multistep method (Liu et al. 2022, eq. 12 with the DDIM transfer
    eq. 9), as diffusers' PNDMScheduler(skip_prk_steps=True) runs it:
    - it combines the raw network outputs (eps, or v for v-prediction) and converts the
      combination with the current latent;
    - step 0 is a DDIM step; step 1 evaluates the network at the new point, averages the two
      outputs and redoes step 0 from its starting latent (the scheduler's repeated timestep);
      that second output is not kept in the multistep history;
    - `transfers[k] = (sigma_from, sigma_to)`: where step k converts and lands (diffusers' t and
      t - T // steps; step 1 uses t + T // steps and t). Default: (sigmas[k], sigmas[k+1]).
    """
    history, start = [], None  # raw outputs (diffusers' ets); step 0's latent, VP
    for k in range(len(sigmas) - 1):
        sigma_from, sigma_to = transfers[k] if transfers is not None else (sigmas[k], sigmas[k + 1])
        out = model.output(x, sigmas[k])
        x_from = _rescale(x, sigmas[k], sigma_from)
        if k == 1:
            out = (out + history[-1]) / 2
            x_from = start * ve_scale(sigma_from)
        else:
            history = (history + [out])[-4:]
            out = sum(w * o for w, o in zip(_PLMS_WEIGHTS[len(history)], reversed(history)))
            if k == 0:
                start = x / ve_scale(sigmas[0])
        x0, eps = model.x0_eps(x_from, sigma_from, out)
        x = _ddim_transfer(x0, eps, sigma_to, sigmas[k + 1])
        yield x


SAMPLERS = {
    "ddim": sample_ddim,
    "pndm": sample_pndm,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_karras": sample_dpmpp_2m,
}
# The diffusers scheduler each sampler reproduces.
SCHEDULER_OF = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
}
FALLBACK_SAMPLER = "euler"


def default_sampler(config: ScheduleConfig) -> str:
    """The sampler matching the checkpoint's scheduler class. Unknown classes fall back to "euler"
    (robust first-order, fractional-free timesteps) with a warning."""
    cls = config.scheduler_class
    if cls == "DPMSolverMultistepScheduler":
        return "dpmpp_2m_karras" if config.use_karras_sigmas else "dpmpp_2m"
    for name, scheduler in SCHEDULER_OF.items():
        if scheduler == cls:
            return name
    warnings.warn(f"scheduler class {cls!r} has no sdlite sampler; using {FALLBACK_SAMPLER!r}")
    return FALLBACK_SAMPLER


# ------------------------------------------------------------------------------------------ plans


@dataclass(frozen=True)
class Plan:
    """Everything one sampling run needs; built by make_plan."""

    sampler: str
    prediction_type: str
    sigmas: torch.Tensor  # (num_steps + 1,) VE sigma of x before each step, then after the last
    timesteps: torch.Tensor  # (num_steps,) what diffusers passes the network at each step
    init_noise_sigma: float  # txt2img: x = noise * init_noise_sigma
    options: dict = field(default_factory=dict)  # sampler-specific keyword options

    @property
    def num_steps(self) -> int:
        """Network evaluations (= yields) this plan runs; PNDM runs one more than `steps` (from 2 steps)."""
        return len(self.timesteps)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """img2img start: the clean latents x0 noised to sigmas[0] (VE; diffusers' add_noise at
        the first timestep, times sqrt(1 + sigma^2)). With no steps, x0 itself."""
        sigma = self.sigmas[0]
        if torch.isinf(sigma):  # zero terminal SNR: sqrt(alpha_bar) = 0, the VP latent is the noise
            return noise.clone()
        return x0 + noise * sigma

    def to_latents(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The VP latents diffusers holds after step i (i = -1: before the first step)."""
        return x / ve_scale(self.sigmas[i + 1])

    def denoiser(self, model_fn: ModelFn) -> Denoiser:
        pairs = {float(s): t for s, t in zip(self.sigmas[:-1], self.timesteps)}
        return Denoiser(model_fn, self.prediction_type, timestep_table=pairs)

    def sample(self, model_fn: ModelFn, x: torch.Tensor, generator: torch.Generator | None = None):
        """Generator yielding x (VE scale, at sigmas[i+1]) after each step i."""
        return SAMPLERS[self.sampler](self.denoiser(model_fn), x, self.sigmas, generator=generator, **self.options)


def make_plan(sampler: str, config: ScheduleConfig, steps: int, strength: float = 1.0) -> Plan:
    """The plan diffusers' pipeline would run with `SCHEDULER_OF[sampler].from_config(config)`,
    `steps` inference steps and img2img `strength` (1.0: txt2img, the full schedule). The sampler
    name decides Karras sigmas for DPM-Solver++ (`dpmpp_2m` never, `dpmpp_2m_karras` always), whatever
    the config's `use_karras_sigmas`, which picks the default sampler instead (`default_sampler`).

    img2img keeps the last min(int(steps * strength), steps) steps (diffusers' get_timesteps).
    When that is 0 (e.g. strength=0) the plan runs no step and returns the image unchanged
    (diffusers errors, or for PNDM runs one step at its lowest timestep).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {sorted(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if steps > config.num_train_timesteps:
        raise ValueError(f"steps={steps} exceeds num_train_timesteps={config.num_train_timesteps}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    cls = SCHEDULER_OF[sampler]
    spacing = config.setting("timestep_spacing", cls)
    kept = min(int(steps * strength), steps)
    if kept == 0:
        return Plan(sampler, config.prediction_type, torch.zeros(1), torch.zeros(0, dtype=torch.int64), 1.0)
    start = steps - kept
    planner = {"ddim": _ddim_plan, "pndm": _pndm_plan, "euler": _euler_plan, "euler_a": _euler_plan}.get(
        sampler, _dpm_plan
    )
    sigmas, timesteps, options, init_noise_sigma = planner(sampler, config, cls, spacing, int(steps), start)
    return Plan(sampler, config.prediction_type, sigmas, timesteps, float(init_noise_sigma), options)


def _discrete_sigma(ac: torch.Tensor, t: int, final: torch.Tensor) -> torch.Tensor:
    """VE sigma at integer timestep t; t < 0 means DDIM/PNDM's final alpha (1 or alpha_bar[0])."""
    if t >= len(ac):  # e.g. 1000 "leading" steps with steps_offset=1 (diffusers: IndexError)
        raise ValueError(f"too many steps for this schedule: they reach timestep {t}, past the model's {len(ac)} training timesteps")
    a = ac[t] if t >= 0 else final
    return ((1 - a) / a) ** 0.5


def _ddim_plan(sampler, config, cls, spacing, steps, start):
    ac = S.alphas_cumprod(config)
    final = torch.tensor(1.0) if config.setting("set_alpha_to_one", cls) else ac[0]
    ts = S.spaced_timesteps(spacing, steps, config.num_train_timesteps, config.steps_offset).astype(np.int64)
    ratio = config.num_train_timesteps // steps
    sig = [_discrete_sigma(ac, int(t), final) for t in ts]
    targets = [_discrete_sigma(ac, int(t) - ratio, final) for t in ts]
    sigmas = torch.stack(sig + [targets[-1]])[start:]
    if torch.isinf(sigmas[0]) and config.prediction_type == "epsilon":
        raise ValueError(
            "zero terminal SNR with epsilon prediction: DDIM cannot denoise at the t=999 step "
            "(diffusers produces NaN); use v_prediction or 'leading' spacing"
        )
    options = dict(targets=torch.stack(targets)[start:])
    if config.setting("clip_sample", cls):
        options["clip_x0"] = config.clip_sample_range
    return sigmas, torch.from_numpy(ts[start:].copy()), options, ve_scale(sigmas[0])


def _pndm_plan(sampler, config, cls, spacing, steps, start):
    if config.rescale_betas_zero_snr:
        raise ValueError(
            "PNDMScheduler has no zero-terminal-SNR support (diffusers ignores rescale_betas_zero_snr "
            "there); use 'ddim', 'euler', 'euler_a' or 'dpmpp_2m' for this model"
        )
    ac = S.alphas_cumprod(config)
    final = torch.tensor(1.0) if config.setting("set_alpha_to_one", cls) else ac[0]
    up = S.spaced_timesteps(spacing, steps, config.num_train_timesteps, config.steps_offset)[::-1]
    up = up.astype(np.int64)  # ascending
    ts = np.concatenate([up[:-1], up[-2:-1], up[-1:]])[::-1][start:]  # the repeated timestep
    ratio = config.num_train_timesteps // steps
    transfers = []
    for k, t in enumerate(int(t) for t in ts):
        t_from, t_to = (t + ratio, t) if k == 1 else (t, t - ratio)
        transfers.append((_discrete_sigma(ac, t_from, final), _discrete_sigma(ac, t_to, final)))
    sigmas = torch.stack([_discrete_sigma(ac, int(t), final) for t in ts] + [transfers[-1][1]])
    return sigmas, torch.from_numpy(ts.copy()), dict(transfers=transfers), ve_scale(sigmas[0])


def _euler_plan(sampler, config, cls, spacing, steps, start):
    ac = S.alphas_cumprod(config, clamp_zero_snr=True)
    train = S.sigmas_from_alphas_cumprod(ac).numpy()  # float32, ascending t
    ts = S.spaced_timesteps(spacing, steps, config.num_train_timesteps, config.steps_offset, rounded=False)
    sigmas = S.interp_sigmas(ts, train)
    if sampler == "euler" and config.setting("use_karras_sigmas", cls):
        sigmas = S.karras_sigmas(sigmas[-1].item(), sigmas[0].item(), steps)
        ts = S.sigma_to_t(sigmas, np.log(train))
    sigmas = S.append_zero(torch.from_numpy(sigmas.astype(np.float32)))
    sigma_max = sigmas.max()
    init = sigma_max if spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
    return sigmas[start:], torch.from_numpy(ts.astype(np.float32))[start:], {}, init


def _dpm_plan(sampler, config, cls, spacing, steps, start):
    ac = S.alphas_cumprod(config, clamp_zero_snr=True)
    train = S.sigmas_from_alphas_cumprod(ac).numpy()
    ts = S.dpm_solver_timesteps(spacing, steps, config.num_train_timesteps, config.steps_offset)
    if sampler == "dpmpp_2m_karras":
        sigmas = S.karras_sigmas(train[0].item(), train[-1].item(), steps)
        ts = S.sigma_to_t(sigmas, np.log(train))
        if config.beta_schedule != "squaredcos_cap_v2":  # diffusers rounds, except for cosine
            ts = ts.round()
    else:
        sigmas = S.interp_sigmas(ts, train)
    if (sigmas[1:] >= sigmas[:-1]).any():  # h = 0 in a step: NaN latents (diffusers gives them too)
        raise ValueError(f"{sampler} cannot take {steps} steps on this schedule: two steps land on the same "
                         "noise level; use fewer steps")
    sigmas = S.append_zero(torch.from_numpy(sigmas.astype(np.float32)))[start:]
    return sigmas, torch.from_numpy(ts.astype(np.int64))[start:], {}, ve_scale(sigmas[0])
