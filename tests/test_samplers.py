"""Samplers against diffusers' schedulers, step by step, with an analytic fake network.

For each sampler x prediction type x scheduler config x (txt2img | img2img strength) we run
diffusers' own loop (from_config, set_timesteps, get_timesteps + set_begin_index + add_noise for
img2img, init_noise_sigma, scale_model_input, step with the generator) and sdlite's plan with the
same fake network and seeds, and compare:
  - the timesteps handed to the network (exactly),
  - the latents after every step (plan.to_latents vs diffusers' `latents`), atol 1e-4.
Why 1e-4: both sides compute in float32 but in different algebraic forms (VE vs VP), so they differ
by float32 rounding (~1e-6 on O(1) latents, up to ~1e-5 where the zero-SNR sigma is 4096); 1e-4 is
far below what a decoded image can show (2/255 in pixels is ~1e-2 in latents) and far above noise.
"""

import json
from pathlib import Path

import diffusers
import pytest
import torch

from sdlite.samplers import SAMPLERS, SCHEDULER_OF, default_sampler, make_plan
from sdlite.schedules import ScheduleConfig, alphas_cumprod

REFERENCE = Path("/work/shared/reference-configs")
SHAPE = (1, 4, 8, 8)
ATOL = 1e-4


def _reference(name: str) -> dict:
    path = REFERENCE / name / "scheduler" / "scheduler_config.json"
    if path.exists():
        return json.loads(path.read_text())
    # The real SD 1.5 / SD 2.1-v scheduler configs, should the shared folder be missing.
    base = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                timestep_spacing="leading", trained_betas=None)
    if name == "sd-1.5":
        return dict(base, _class_name="PNDMScheduler", prediction_type="epsilon")
    return dict(base, _class_name="DDIMScheduler", prediction_type="v_prediction")


SD15 = _reference("sd-1.5")
SD21V = _reference("sd-2.1-768-v")
CONFIGS = {
    "sd15": SD15,
    "sd21v": SD21V,
    "trailing": dict(SD15, timestep_spacing="trailing", steps_offset=0),
    "linspace": dict(SD15, timestep_spacing="linspace"),
    "zero_snr": dict(SD21V, rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=0),
    "linear_cosine": dict(SD15, beta_schedule="squaredcos_cap_v2", set_alpha_to_one=True),
    "linear_betas": dict(SD15, beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "sdxl_euler_karras": dict(_reference("sdxl-base-1.0"), use_karras_sigmas=True),
    # Keys left out take the checkpoint class's defaults, then the sampler class's (DDIM:
    # set_alpha_to_one=True, clip_sample=True; Euler/DPM: "linspace" spacing).
    "bare_ddim": dict(_class_name="DDIMScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "bare_euler": dict(_class_name="EulerDiscreteScheduler"),
}
# (steps, strength); 1.0 is txt2img. 7 and 13 do not divide 1000 (trailing/linspace then make
# DDIM/PNDM land between timesteps); 0.15 of 10 keeps one step (PNDM then runs two).
CASES = [(13, 1.0), (7, 1.0), (1, 1.0), (10, 0.55), (20, 0.3), (10, 0.15)]


def fake_network(config: dict):
    """A smooth stand-in for a UNet: the eps or v a network would output if its clean-image guess
    were x0_hat = 1.2 tanh(x) + 0.2 sin(t/150 + x): bounded, so trajectories stay O(1) like real
    ones, and past +-1 at times, so DDIM's clip_sample has work to do."""
    ac = alphas_cumprod(ScheduleConfig.from_json(config))

    def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.to(torch.float32)
        lo = tt.floor().long().clamp(max=len(ac) - 2)
        a = torch.lerp(ac[lo], ac[lo + 1], tt - lo)  # alpha_bar at fractional t
        x0_hat = 1.2 * torch.tanh(x) + 0.2 * torch.sin(tt / 150 + x)
        eps = (x - a.sqrt() * x0_hat) / (1 - a).sqrt()
        if config["prediction_type"] == "epsilon":
            return eps
        return a.sqrt() * eps - (1 - a).sqrt() * x0_hat

    return network


def diffusers_run(sampler, config, steps, strength, x0, noise, seed):
    """diffusers' pipeline loop; returns (timesteps passed to the network, latents after each step)."""
    src = getattr(diffusers, config["_class_name"]).from_config(config)
    overrides = {
        "pndm": dict(skip_prk_steps=True),  # sdlite's pndm is always PLMS
        "dpmpp_2m": dict(use_karras_sigmas=False),
        "dpmpp_2m_karras": dict(use_karras_sigmas=True),
    }
    sched = getattr(diffusers, SCHEDULER_OF[sampler]).from_config(src.config, **overrides.get(sampler, {}))
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if strength < 1.0:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = sched.timesteps[t_start * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        latents = sched.add_noise(x0, noise, timesteps[:1])
    else:
        latents = noise * sched.init_noise_sigma
    generator = torch.Generator().manual_seed(seed)
    kwargs = {"generator": generator} if sampler in ("euler_a", "dpmpp_2m", "dpmpp_2m_karras") else {}
    seen, trajectory, network = [], [], fake_network(config)
    for t in timesteps:
        seen.append(t)
        latents = sched.step(network(sched.scale_model_input(latents, t), t), t, latents, **kwargs).prev_sample
        trajectory.append(latents)
    return seen, trajectory


def sdlite_run(sampler, config, steps, strength, x0, noise, seed):
    plan = make_plan(sampler, ScheduleConfig.from_json(config), steps, strength)
    seen, fake = [], fake_network(config)

    def network(x, t):
        seen.append(t)
        return fake(x, t)

    x = plan.add_noise(x0, noise) if strength < 1.0 else noise * plan.init_noise_sigma
    generator = torch.Generator().manual_seed(seed)
    trajectory = []
    for i, x in enumerate(plan.sample(network, x, generator=generator)):
        # diffusers' Euler schedulers hold the VE latent x itself, the others the VP latent
        trajectory.append(x if sampler in ("euler", "euler_a") else plan.to_latents(x, i))
    if trajectory and sampler in ("euler", "euler_a"):  # after the last step (sigma 0) they agree
        assert torch.equal(plan.to_latents(x, plan.num_steps - 1), x)
    assert len(trajectory) == plan.num_steps
    return seen, trajectory


def _unsupported(sampler, config):
    """Combinations make_plan refuses: PNDM with zero SNR (diffusers silently ignores it); DDIM
    with zero SNR and epsilon prediction (diffusers gives NaN)."""
    zero_snr = config.get("rescale_betas_zero_snr", False)
    if sampler == "pndm":
        return zero_snr
    return sampler == "ddim" and zero_snr and config["prediction_type"] == "epsilon"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_matches_diffusers(sampler, config_name, prediction_type):
    config = dict(CONFIGS[config_name], prediction_type=prediction_type)
    if _unsupported(sampler, config):
        with pytest.raises(ValueError):
            make_plan(sampler, ScheduleConfig.from_json(config), 10)
        return
    for steps, strength in CASES:
        if sampler == "dpmpp_2m_karras" and config_name == "linear_cosine" and strength == 1.0:
            continue  # diffusers truncates the cosine Karras timesteps to repeated ints and then
            # indexes past its sigmas (IndexError); img2img, which sets begin_index, works.
        seed = steps * 7 + int(strength * 100)
        g = torch.Generator().manual_seed(seed)
        x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        ref_t, ref = diffusers_run(sampler, config, steps, strength, x0, noise, seed + 1)
        our_t, ours = sdlite_run(sampler, config, steps, strength, x0, noise, seed + 1)
        where = f"{sampler} {config_name} {prediction_type} steps={steps} strength={strength}"
        assert [t.item() for t in our_t] == [t.item() for t in ref_t], where
        assert [t.dtype for t in our_t] == [t.dtype for t in ref_t], where
        assert len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref)):
            err = (a - b).abs().max().item()
            assert err <= ATOL, f"{where} step {i}: max |diff| {err:.2e}"


def test_strength_zero_returns_image():
    plan = make_plan("euler", ScheduleConfig.from_json(SD15), 20, strength=0.0)
    assert plan.num_steps == 0
    x0 = torch.randn(SHAPE)
    x = plan.add_noise(x0, torch.randn(SHAPE))
    assert list(plan.sample(fake_network(SD15), x)) == []
    assert torch.equal(plan.to_latents(x, plan.num_steps - 1), x0)


def test_pndm_runs_one_extra_step():
    assert make_plan("pndm", ScheduleConfig.from_json(SD15), 10).num_steps == 11


def test_make_plan_errors():
    config = ScheduleConfig.from_json(SD15)
    with pytest.raises(ValueError, match="valid samplers.*dpmpp_2m"):
        make_plan("heun", config, 10)
    with pytest.raises(ValueError, match="steps"):
        make_plan("euler", config, 0)
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            make_plan("euler", config, 10, strength)
    with pytest.raises(ValueError, match="PNDM"):
        make_plan("pndm", ScheduleConfig.from_json(dict(SD15, rescale_betas_zero_snr=True)), 10)


def test_default_sampler():
    def of(**d):
        return default_sampler(ScheduleConfig.from_json(d))

    assert of(_class_name="PNDMScheduler") == "pndm"
    assert of(_class_name="DDIMScheduler") == "ddim"
    assert of(_class_name="EulerDiscreteScheduler") == "euler"
    assert of(_class_name="EulerAncestralDiscreteScheduler") == "euler_a"
    assert of(_class_name="DPMSolverMultistepScheduler") == "dpmpp_2m"
    assert of(_class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True) == "dpmpp_2m_karras"
    with pytest.warns(UserWarning, match="LMSDiscreteScheduler"):
        assert of(_class_name="LMSDiscreteScheduler") == "euler"


@pytest.mark.parametrize("scheduler", ["UniPCMultistepScheduler", "DEISMultistepScheduler", "DDPMScheduler"])
def test_checkpoints_saved_with_other_schedulers_load_and_fall_back_to_euler(scheduler):
    """Their configs share key names with DPM-Solver's (solver_type "bh2", algorithm_type "deis",
    variance_type "fixed_small") for settings no sdlite sampler reads."""
    config = dict(getattr(diffusers, scheduler).from_config(dict(SD15)).config)
    config = ScheduleConfig.from_json({k: v for k, v in config.items() if k != "_use_default_values"}
                                      | {"_class_name": scheduler})
    with pytest.warns(UserWarning, match=scheduler):
        assert default_sampler(config) == "euler"
    assert make_plan("dpmpp_2m", config, 10).num_steps == 10


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_dpm_steps_landing_on_one_noise_level_are_refused(spacing):
    config = ScheduleConfig.from_json(dict(CONFIGS["sd15"], timestep_spacing=spacing))
    with pytest.raises(ValueError, match="cannot take 1000 steps on this schedule"):
        make_plan("dpmpp_2m", config, 1000)
    assert make_plan("dpmpp_2m", config, 500).num_steps == 500


@pytest.mark.parametrize("sampler", ["ddim", "pndm"])
def test_steps_past_the_training_timesteps_are_refused(sampler):
    config = ScheduleConfig.from_json(dict(CONFIGS["sd15"]))
    make_plan(sampler, config, 999)
    with pytest.raises(ValueError, match="past the model's 1000 training timesteps"):
        make_plan(sampler, config, 1000)
