"""Schedules and the denoiser wrapper: config parsing, and each pure function against diffusers."""

import math

import diffusers
import numpy as np
import pytest
import torch

from sdlite.denoiser import Denoiser
from sdlite.schedules import (
    ScheduleConfig,
    alphas_cumprod,
    append_zero,
    dpm_solver_timesteps,
    karras_sigmas,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
    ve_scale,
)

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def test_from_json_reads_known_keys_and_ignores_others():
    config = ScheduleConfig.from_json(
        dict(SD, _class_name="DDIMScheduler", prediction_type="v_prediction", _diffusers_version="0.42.1",
             clip_sample=False, trained_betas=None, sample_max_value=1.0, some_future_key=3)
    )
    assert config.scheduler_class == "DDIMScheduler"
    assert config.prediction_type == "v_prediction"
    assert config.beta_schedule == "scaled_linear" and config.steps_offset == 1
    assert config.clip_sample is False and config.timestep_spacing is None


@pytest.mark.parametrize(
    "bad",
    [
        dict(trained_betas=[0.1] * 1000),
        dict(prediction_type="sample"),
        dict(thresholding=True),
        dict(beta_schedule="sigmoid"),
        dict(timestep_spacing="uniform"),
        dict(algorithm_type="sde-dpmsolver++"),
        dict(solver_order=3),
        dict(final_sigmas_type="sigma_min"),
        dict(use_exponential_sigmas=True),
        dict(variance_type="learned_range", _class_name="DDPMScheduler"),  # a UNet with variance channels
    ],
)
def test_from_json_rejects_unsupported_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ScheduleConfig.from_json(dict(SD, **bad))


def test_missing_keys_take_the_sampler_class_defaults():
    config = ScheduleConfig.from_json(dict(SD, _class_name="EulerDiscreteScheduler"))
    assert config.setting("timestep_spacing", "EulerDiscreteScheduler") == "linspace"
    assert config.setting("timestep_spacing", "DDIMScheduler") == "leading"
    assert config.setting("set_alpha_to_one", "DDIMScheduler") is True
    assert config.setting("set_alpha_to_one", "PNDMScheduler") is False
    assert config.setting("clip_sample", "DDIMScheduler") is True
    # An in-memory diffusers config lists the keys it only defaulted; they count as absent.
    in_memory = ScheduleConfig.from_json(dict(diffusers.DDIMScheduler.from_config(SD).config))
    assert in_memory.setting("timestep_spacing", "EulerDiscreteScheduler") == "linspace"
    assert in_memory.steps_offset == 1
    explicit = ScheduleConfig.from_json(dict(SD, timestep_spacing="trailing", set_alpha_to_one=False))
    assert explicit.setting("timestep_spacing", "EulerDiscreteScheduler") == "trailing"
    assert explicit.setting("set_alpha_to_one", "DDIMScheduler") is False


@pytest.mark.parametrize(
    "extra",
    [
        dict(),
        dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(rescale_betas_zero_snr=True),
    ],
)
def test_alphas_cumprod_match_diffusers(extra):
    d = dict(SD, **extra)
    config = ScheduleConfig.from_json(d)
    assert torch.equal(alphas_cumprod(config), diffusers.DDIMScheduler.from_config(d).alphas_cumprod)
    euler = diffusers.EulerDiscreteScheduler.from_config(d)
    assert torch.equal(alphas_cumprod(config, clamp_zero_snr=True), euler.alphas_cumprod)
    if d.get("rescale_betas_zero_snr"):
        assert alphas_cumprod(config)[-1] == 0 and math.isinf(sigmas_from_alphas_cumprod(alphas_cumprod(config))[-1])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_timestep_spacing_matches_diffusers(spacing, steps):
    d = dict(SD, timestep_spacing=spacing)
    ddim = diffusers.DDIMScheduler.from_config(d)
    ddim.set_timesteps(steps)
    assert np.array_equal(spaced_timesteps(spacing, steps, 1000, 1), ddim.timesteps.numpy())
    euler = diffusers.EulerDiscreteScheduler.from_config(d)
    euler.set_timesteps(steps)
    ours = spaced_timesteps(spacing, steps, 1000, 1, rounded=False).astype(np.float32)
    assert np.array_equal(ours, euler.timesteps.numpy())
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(d)
    dpm.set_timesteps(steps)
    assert np.array_equal(dpm_solver_timesteps(spacing, steps, 1000, 1), dpm.timesteps.numpy())


def test_trailing_spacing_gives_as_many_timesteps_as_steps():
    # diffusers gives steps + 1 (the last -1) for 62 of these counts, e.g. 61; sdlite does not.
    for steps in range(1, 1001):
        for spaced in (spaced_timesteps, dpm_solver_timesteps):
            timesteps = spaced("trailing", steps, 1000, 1)
            assert len(timesteps) == steps and timesteps.min() >= 0 and timesteps.max() == 999, steps


def test_karras_sigmas_and_sigma_to_t_match_diffusers():
    d = dict(SD, use_karras_sigmas=True, timestep_spacing="leading")
    euler = diffusers.EulerDiscreteScheduler.from_config(d)
    euler.set_timesteps(12)
    train = sigmas_from_alphas_cumprod(alphas_cumprod(ScheduleConfig.from_json(d))).numpy()
    ends = np.interp([1, 11 * 83 + 1], np.arange(1000), train)  # Euler's Karras ends: its spaced timesteps
    sigmas = karras_sigmas(ends[0], ends[1], 12)
    assert torch.equal(append_zero(torch.from_numpy(sigmas.astype(np.float32))), euler.sigmas)
    assert np.array_equal(sigma_to_t(sigmas, np.log(train)).astype(np.float32), euler.timesteps.numpy())
    assert np.allclose(sigma_to_t(train[[0, 500, 999]], np.log(train)), [0, 500, 999])


def test_ve_scale_and_append_zero():
    assert torch.equal(append_zero(torch.tensor([3.0, 1.0])), torch.tensor([3.0, 1.0, 0.0]))
    assert ve_scale(torch.tensor(0.0)) == 1 and ve_scale(torch.tensor(math.inf)) == 1
    assert torch.isclose(ve_scale(torch.tensor(2.0)), torch.tensor(5.0).sqrt())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoiser_recovers_x0(prediction_type):
    """An oracle network (knows x0 and eps) makes D(x, sigma) return x0, and the model sees the VP
    latent and the plan's timestep."""
    x0, eps, sigma = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor(3.0)
    a = 1 / (1 + sigma**2)
    seen = []

    def oracle(x_in, t):
        seen.append((x_in, t))
        return eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    x = x0 + sigma * eps
    D = Denoiser(oracle, prediction_type, timestep_table={3.0: torch.tensor(412)})
    assert torch.allclose(D(x, sigma), x0, atol=1e-5)
    assert torch.allclose(seen[0][0], a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-6)
    assert seen[0][1] == 412
    x0_hat, eps_hat = D.x0_eps(x, sigma, D.output(x, sigma))
    assert torch.allclose(eps_hat, eps, atol=1e-5)


def test_denoiser_at_zero_snr_and_unknown_sigmas():
    v = torch.randn(1, 4, 2, 2)
    x_vp = torch.randn(1, 4, 2, 2)
    D = Denoiser(lambda x, t: v, "v_prediction")
    x0, eps = D.x0_eps(x_vp, torch.tensor(math.inf), v)
    assert torch.equal(x0, -v) and torch.equal(eps, x_vp)
    with pytest.raises(ValueError, match="zero SNR"):
        Denoiser(lambda x, t: v, "epsilon").x0_eps(x_vp, torch.tensor(math.inf), v)
    with pytest.raises(ValueError, match="not in this plan"):
        D.timestep(torch.tensor(1.0))
    with pytest.raises(ValueError, match="prediction_type"):
        Denoiser(lambda x, t: v, "sample")
