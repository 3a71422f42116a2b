"""Numeric parity of sdlite's CLIP text encoder, UNet and VAE with transformers/diffusers.

Each reference module comes from `reference_models.build_components` (tiny random SD 1.x / SD 2.x
shapes) or from a tiny SDXL-like config below. Ours is built on the meta device from the reference's
config json and loaded with `load_state_dict(strict=True, assign=True)`, exactly as the loader does.
"""

import json
from pathlib import Path

import pytest
import torch

from reference_models import CROSS_ATTENTION_DIM, build_components
from sdlite.clip import CLIPTextModel
from sdlite.config import CLIPConfig, UNetConfig, VAEConfig
from sdlite.unet import GEGLU, UNet2DConditionModel, chunk_feed_forward
from sdlite.vae import AutoencoderKL

REFERENCE_CONFIGS = Path("/work/shared/reference-configs")
TOL = 1e-4  # max abs difference relative to the reference output's max abs


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= tol * scale, f"max abs diff {err:.3g} > {tol} * {scale:.3g}"


def clip_state_dict(ref) -> dict:
    """transformers >= 5 drops CLIPTextModel's `text_model.` prefix (in memory and when saving);
    checkpoints on the Hub and sdlite keep it. CLIPTextModelWithProjection keeps it in both."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
            for k, v in ref.state_dict().items()}


def build_ours(cls, config, state_dict: dict):
    with torch.device("meta"):
        model = cls(config)
    assert set(model.state_dict()) == set(state_dict)  # exact key sets, before loading
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def sdxl_components(seed: int = 0) -> dict:
    """Tiny SDXL-shaped UNet (DownBlock first, transformer_layers_per_block list, text_time
    embedding) and a CLIPTextModelWithProjection (gelu, projection) for text_encoder_2."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_dim, time_dim = 24, 8
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, layers_per_block=2, norm_num_groups=8, cross_attention_dim=2 * CROSS_ATTENTION_DIM,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=text_dim + 6 * time_dim,
    )
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=CROSS_ATTENTION_DIM, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
        projection_dim=text_dim, max_position_embeddings=77, vocab_size=49408, bos_token_id=49406,
        eos_token_id=49407, hidden_act="gelu", pad_token_id=1,
    ))
    with torch.no_grad():
        for module in (unet, text_encoder):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return dict(unet=unet.eval(), text_encoder=text_encoder.eval())


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def components(request):
    return build_components(request.param)


@pytest.fixture(scope="module")
def sdxl():
    return sdxl_components()


def token_ids(batch: int = 2, T: int = 77) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49406, (batch, T), generator=g)
    ids[:, 0] = 49406
    ids[0, 7:] = 49407  # padded with eos (SD 1.x)
    ids[1, 12] = 49407  # eos then other padding (SD 2.x's "!")
    return ids


def unet_inputs(B: int, H: int, W: int, D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, H, W, generator=g), torch.randn(B, 77, D, generator=g)


# ---------------------------------------------------------------------------------------- CLIP

def check_clip(ref, ours, ids):
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        o = ours(ids)
    assert_close(o.last_hidden_state, r.last_hidden_state)
    assert_close(o.penultimate_hidden_state, r.hidden_states[-2])
    return o, r


def test_clip(components):
    ref = components["text_encoder"]
    ours = build_ours(CLIPTextModel, CLIPConfig.from_json(ref.config.to_dict()), clip_state_dict(ref))
    o, r = check_clip(ref, ours, token_ids())
    assert_close(o.pooled_output, r.pooler_output)
    assert o.text_embeds is None


def test_clip_old_eos_rule(components):
    """Configs with eos_token_id=2 (pre transformers#24773) pool at the highest token id."""
    from transformers import CLIPTextModel as RefCLIP

    ref = components["text_encoder"]
    ref_config = ref.config.to_dict() | {"eos_token_id": 2}
    ref2 = RefCLIP(type(ref.config)(**ref_config)).eval()
    ref2.load_state_dict(ref.state_dict())
    ours = build_ours(CLIPTextModel, CLIPConfig.from_json(ref_config), clip_state_dict(ref2))
    ids = token_ids()
    ids[0, 7:] = 1  # no eos at all: the argmax rule picks the highest id, the new rule position 0
    o, r = check_clip(ref2, ours, ids)
    assert_close(o.pooled_output, r.pooler_output)


def test_clip_with_projection(sdxl):
    ref = sdxl["text_encoder"]
    config = CLIPConfig.from_json(ref.config.to_dict(), with_projection=True)
    ours = build_ours(CLIPTextModel, config, clip_state_dict(ref))
    o, r = check_clip(ref, ours, token_ids())
    assert_close(o.text_embeds, r.text_embeds)


# ---------------------------------------------------------------------------------------- UNet

def test_unet(components):
    ref = components["unet"]
    ours = build_ours(UNet2DConditionModel, UNetConfig.from_json(dict(ref.config)), ref.state_dict())
    for (H, W), t in (((8, 8), torch.tensor([10, 981])), ((5, 8), 333.5), ((8, 8), 999), ((6, 10), torch.tensor(0.25))):
        x, ctx = unet_inputs(2, H, W, CROSS_ATTENTION_DIM)
        with torch.no_grad():
            assert_close(ours(x, t, ctx), ref(x, t, ctx).sample)


def test_a_projected_context_keeps_the_cross_attention_keys_and_values(components):
    """Calls on a ProjectedContext give the plain calls' numbers and project the text once."""
    from sdlite.layers import ProjectedContext

    ours = build_ours(UNet2DConditionModel, UNetConfig.from_json(dict(components["unet"].config)),
                      components["unet"].state_dict())
    cross = [m for name, m in ours.named_modules() if name.endswith("attn2")]
    calls = []
    for layer in cross:
        layer.to_k.register_forward_hook(lambda module, args, out: calls.append(module))
    x, ctx = unet_inputs(2, 8, 8, CROSS_ATTENTION_DIM)
    projected = ProjectedContext(ctx)
    with torch.no_grad():
        for t in (999, 10):
            plain = ours(x, t, ctx)
            calls.clear()
            assert torch.equal(ours(x, t, projected), plain)
            assert len(calls) == (len(cross) if t == 999 else 0)  # projected at the first call only
    assert cross and len(projected.projections) == len(cross)


@pytest.mark.parametrize("n", [1, 2])
def test_samples_shared_by_two_texts_run_once_until_the_text_reaches_them(components, n):
    """n samples for 2n texts (classifier-free guidance) give the diffusers UNet's output for the
    samples repeated; the layers before the first cross-attention run on the n samples only. Per-
    sample timesteps make the samples differ from the start: they are repeated there."""
    ref = components["unet"]
    ours = build_ours(UNet2DConditionModel, UNetConfig.from_json(dict(ref.config)), ref.state_dict())
    x, ctx = unet_inputs(2 * n, 8, 8, CROSS_ATTENTION_DIM)
    x = x[:n]
    first_cross = next(m for name, m in ours.named_modules() if name.endswith("attn2"))
    rows = {}
    for name, module in (("conv_in", ours.conv_in), ("resnet", ours.down_blocks[0].resnets[0]),
                         ("cross", first_cross), ("out", ours.conv_out)):
        module.register_forward_pre_hook(lambda m, args, name=name: rows.setdefault(name, []).append(len(args[0])))
    with torch.no_grad():
        for t in (500, torch.tensor([10, 981] * n)):
            rows.clear()
            assert_close(ours(x, t, ctx), ref(torch.cat([x, x]), t, ctx).sample)
            shared = isinstance(t, int)
            assert rows == {"conv_in": [n if shared else 2 * n], "resnet": [n if shared else 2 * n],
                            "cross": [2 * n], "out": [2 * n]}
        with pytest.raises(ValueError, match="samples for"):
            ours(torch.cat([x, x, x]), 500, ctx)


@pytest.mark.parametrize("layout", ["no cross-attention", "only cross-attention", "mid block only"])
def test_samples_shared_by_two_texts_in_other_unet_layouts(layout):
    """Shared samples meet the text first in attn1 (only_cross_attention), in the mid block, or
    nowhere (the output is repeated): the diffusers UNet's output for the samples repeated."""
    import diffusers

    torch.manual_seed(0)
    cross = layout != "no cross-attention"
    levels = ("CrossAttnDownBlock2D", "DownBlock2D") if layout == "only cross-attention" else ("DownBlock2D",) * 2
    ref = diffusers.UNet2DConditionModel(
        sample_size=8, layers_per_block=1, cross_attention_dim=CROSS_ATTENTION_DIM, norm_num_groups=8,
        block_out_channels=(16, 32), attention_head_dim=4, down_block_types=levels,
        up_block_types=tuple(t.replace("Down", "Up") for t in levels[::-1]),
        mid_block_type="UNetMidBlock2DCrossAttn" if layout == "mid block only" else None,
        only_cross_attention=layout == "only cross-attention").eval()
    ours = build_ours(UNet2DConditionModel, UNetConfig.from_json(dict(ref.config)), ref.state_dict())
    x, ctx = unet_inputs(2, 8, 8, CROSS_ATTENTION_DIM)
    rows = []
    first = ours.conv_in.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
    with torch.no_grad():
        assert_close(ours(x[:1], 500, ctx), ref(torch.cat([x[:1]] * 2), 500, ctx).sample)
    assert rows == [1] and cross == any(name.endswith("attn2") for name, _ in ours.named_modules())
    first.remove()


def test_shared_samples_keep_their_layout_and_bad_batches_fail_up_front(components):
    from sdlite.layers import repeat_samples

    x = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    assert repeat_samples(x, 2).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(repeat_samples(x, 2), torch.cat([x, x])) and repeat_samples(x, 1) is x
    ref = components["unet"]
    ours = build_ours(UNet2DConditionModel, UNetConfig.from_json(dict(ref.config)), ref.state_dict())
    calls = []
    ours.conv_in.register_forward_pre_hook(lambda *a: calls.append(1))
    x, ctx = unet_inputs(4, 8, 8, CROSS_ATTENTION_DIM)
    with torch.no_grad(), pytest.raises(ValueError, match="3 samples for 4 text contexts"):
        ours(x[:3], 500, ctx)
    with torch.no_grad(), pytest.raises(ValueError, match="timestep: one value, or one per text context"):
        ours(x[:2], torch.tensor([10, 981]), ctx)
    assert not calls


def test_sdxl_samples_shared_by_two_texts_are_repeated_from_the_start(sdxl):
    """SDXL's added conditioning differs per text, and so do its resnets' outputs from the first."""
    ref = sdxl["unet"]
    ours = build_ours(UNet2DConditionModel, UNetConfig.from_json(dict(ref.config)), ref.state_dict())
    g = torch.Generator().manual_seed(1)
    added = {"text_embeds": torch.randn(2, 24, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    x, ctx = unet_inputs(2, 8, 8, 2 * CROSS_ATTENTION_DIM)
    with torch.no_grad():
        assert_close(ours(x[:1], 500, ctx, added), ref(torch.cat([x[:1]] * 2), 500, ctx, added_cond_kwargs=added).sample)


def test_unet_and_vae_with_long_attention_on_onednn(components, monkeypatch):
    """`sdlite.layers.onednn_attention` runs attention over 1,024 keys or more; the tiny models
    have fewer, so the threshold comes down to 16 here (self- and cross-attention, the VAE's too)."""
    from sdlite import layers

    calls = []
    monkeypatch.setattr(layers, "LONG_KEYS", 16)
    monkeypatch.setattr(layers, "SCORES_BLOCK", 20 * 64)  # blocks of 20 queries of 64 keys
    attend = layers.onednn_attention
    monkeypatch.setattr(layers, "onednn_attention", lambda *a: calls.append(a[1].shape[1]) or attend(*a))
    unet, vae = components["unet"], components["vae"]
    ours = build_ours(UNet2DConditionModel, UNetConfig.from_json(dict(unet.config)), unet.state_dict())
    ours_vae = build_ours(AutoencoderKL, VAEConfig.from_json(dict(vae.config)), vae.state_dict())
    x, ctx = unet_inputs(2, 8, 8, CROSS_ATTENTION_DIM)
    z = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(1))  # 30 tokens in the VAE's attention
    with torch.no_grad():
        assert_close(ours(x, 500, ctx), unet(x, 500, ctx).sample)
        assert {64, 77} <= set(calls)
        calls.clear()
        assert_close(ours_vae.decode(z), vae.decode(z).sample)
        assert calls


def test_unet_and_vae_with_winograd_convolutions(components, monkeypatch):
    """sdlite.winograd runs 3x3 convolutions of at least `MIN_CHANNELS` channels on inputs at
    least 8 pixels a side (16 for the VAE, whose weights are transformed per call); the tiny models
    are narrower, so the threshold comes down to 16 here. The UNet at 32x32 latents and the VAE
    decoding 8x8 ones take both tilings."""
    from sdlite import kernels, winograd

    if kernels.library() is None:
        pytest.skip("no C compiler builds sdlite's kernels here")
    calls = []
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 16)
    conv = winograd.conv
    monkeypatch.setattr(winograd, "conv", lambda x, w, b, tiling: calls.append(tiling) or conv(x, w, b, tiling))
    unet, vae = components["unet"], components["vae"]
    ours = build_ours(UNet2DConditionModel, UNetConfig.from_json(dict(unet.config)), unet.state_dict())
    ours_vae = build_ours(AutoencoderKL, VAEConfig.from_json(dict(vae.config)), vae.state_dict())
    x, ctx = unet_inputs(2, 32, 32, CROSS_ATTENTION_DIM)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(x, 500, ctx), unet(x, 500, ctx).sample)
        assert set(calls) == {winograd.F2, winograd.F4}
        calls.clear()
        assert_close(ours_vae.decode(z), vae.decode(z).sample)
        assert set(calls) == {winograd.F2, winograd.F4}


def test_networks_trace_whole_for_torch_compile(components):
    """torch.compile sees each network as one graph: no graph break where sdlite picks its CPU
    kernels (`runs_on_onednn` answers before asking oneDNN, which dynamo does not trace)."""
    import torch._dynamo

    unet, vae, text = components["unet"], components["vae"], components["text_encoder"]
    ours_unet = build_ours(UNet2DConditionModel, UNetConfig.from_json(dict(unet.config)), unet.state_dict())
    ours_vae = build_ours(AutoencoderKL, VAEConfig.from_json(dict(vae.config)), vae.state_dict())
    ours_text = build_ours(CLIPTextModel, CLIPConfig.from_json(text.config.to_dict()), clip_state_dict(text))
    x, ctx = unet_inputs(2, 8, 8, CROSS_ATTENTION_DIM)
    with torch.no_grad():
        for function, args in ((ours_unet, (x, torch.tensor(500.0), ctx)), (ours_vae.decode, (x[:1],)),
                               (ours_text, (token_ids(),))):
            explained = torch._dynamo.explain(function)(*args)
            assert explained.graph_break_count == 0, explained.break_reasons[0].reason


def test_feed_forward_in_token_slices_matches_the_whole(components):
    """Low-memory mode's chunk_feed_forward: the same UNet output, slices of 7 tokens (the last
    one shorter) against all 64 at once, and a no-op for calls with fewer tokens."""
    ref = components["unet"]
    ours = build_ours(UNet2DConditionModel, UNetConfig.from_json(dict(ref.config)), ref.state_dict())
    x, ctx = unet_inputs(2, 8, 8, CROSS_ATTENTION_DIM)
    tokens_per_call = []  # tokens of each GEGLU call, to see the slices happen
    for module in ours.modules():
        if isinstance(module, GEGLU):
            module.register_forward_pre_hook(lambda m, args: tokens_per_call.append(args[0].shape[1]))
    with torch.no_grad():
        whole = ours(x, 500, ctx)
        assert 64 in tokens_per_call
        tokens_per_call.clear()
        chunk_feed_forward(ours, 7)
        assert_close(ours(x, 500, ctx), whole, tol=1e-6)
        assert max(tokens_per_call) == 7 and 1 in tokens_per_call  # 64 = 9 * 7 + 1
        chunk_feed_forward(ours, 64)  # no call has more than 64 tokens: nothing is cut
        assert torch.equal(ours(x, 500, ctx), whole)


def test_unet_sdxl(sdxl):
    ref = sdxl["unet"]
    config = UNetConfig.from_json(dict(ref.config))
    assert config.is_sdxl
    ours = build_ours(UNet2DConditionModel, config, ref.state_dict())
    g = torch.Generator().manual_seed(1)
    added = {"text_embeds": torch.randn(2, 24, generator=g),
             "time_ids": torch.tensor([[64.0, 40, 0, 0, 64, 40], [64, 64, 8, 0, 64, 64]])}
    for (H, W), t in (((8, 8), torch.tensor([10, 981])), ((5, 8), 333.5)):
        x, ctx = unet_inputs(2, H, W, 2 * CROSS_ATTENTION_DIM)
        with torch.no_grad():
            assert_close(ours(x, t, ctx, added), ref(x, t, ctx, added_cond_kwargs=added).sample)
    with pytest.raises(ValueError, match="added_cond"):
        ours(x, 1, ctx)


# ----------------------------------------------------------------------------------------- VAE

def test_vae(components):
    ref = components["vae"]
    ours = build_ours(AutoencoderKL, VAEConfig.from_json(dict(ref.config)), ref.state_dict())
    assert ours.config.downscale_factor == 8
    x = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        dist, ref_dist = ours.encode(x), ref.encode(x).latent_dist
        assert_close(dist.mean, ref_dist.mean)
        assert_close(dist.logvar, ref_dist.logvar)
        assert_close(dist.mode(), ref_dist.mode())
        sample = dist.sample(torch.Generator().manual_seed(42))
        assert_close(sample, ref_dist.sample(torch.Generator().manual_seed(42)))
        z = torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(1))
        assert_close(ours.decode(z), ref.decode(z).sample)


# ------------------------------------------------------------------------------ low precision

@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_half_precision_forward(components, dt):
    unet, vae, te = components["unet"], components["vae"], components["text_encoder"]
    ours_unet = build_ours(UNet2DConditionModel, UNetConfig.from_json(dict(unet.config)), unet.state_dict()).to(dt)
    ours_vae = build_ours(AutoencoderKL, VAEConfig.from_json(dict(vae.config)), vae.state_dict()).to(dt)
    ours_te = build_ours(CLIPTextModel, CLIPConfig.from_json(te.config.to_dict()), clip_state_dict(te)).to(dt)
    x, ctx = unet_inputs(2, 5, 8, CROSS_ATTENTION_DIM)
    with torch.no_grad():
        h = ours_te(token_ids()).last_hidden_state
        eps = ours_unet(x.to(dt), torch.tensor([500, 20]), ctx.to(dt))
        ref_eps = unet(x, torch.tensor([500, 20]), ctx).sample
        img = ours_vae.decode(x.to(dt))
        lat = ours_vae.encode(img).sample(torch.Generator().manual_seed(0))
    for out in (h, eps, img, lat):
        assert out.dtype == dt and torch.isfinite(out).all()
    assert_close(eps.float(), ref_eps, tol=0.1)  # bf16 has ~3 significant digits


def test_upcast_attention_runs_in_fp32():
    from sdlite.layers import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 8, generator=g) for _ in range(3))  # large logits
    half = [t.to(torch.bfloat16) for t in (q, k, v)]
    up = attention(*half, heads=2, upcast=True)
    assert up.dtype == torch.bfloat16
    # fp32 math on the bf16-rounded inputs: only the output rounding differs from an fp32 reference
    exact = attention(*[t.float() for t in half], heads=2).to(torch.bfloat16)
    assert torch.equal(up, exact)


# -------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("model", ["sd-1.5", "sd-2.1-base", "sd-2.1-768-v", "sdxl-base-1.0"])
def test_reference_configs_build_with_diffusers_names(model):
    """The real configs parse and give exactly diffusers'/transformers' keys and shapes (on meta)."""
    import diffusers
    import transformers

    folder = REFERENCE_CONFIGS / model
    if not folder.exists():
        pytest.skip(f"{folder} missing")
    read = lambda part: json.loads((folder / part / "config.json").read_text())  # noqa: E731
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    with torch.device("meta"):
        d = read("unet")
        assert shapes(UNet2DConditionModel(UNetConfig.from_json(d))) == shapes(
            diffusers.UNet2DConditionModel.from_config(d))
        d = read("vae")
        assert shapes(AutoencoderKL(VAEConfig.from_json(d))) == shapes(diffusers.AutoencoderKL.from_config(d))
        for part, ref_cls in (("text_encoder", transformers.CLIPTextModel),
                              ("text_encoder_2", transformers.CLIPTextModelWithProjection)):
            if (folder / part).exists():
                d = read(part)
                ours = CLIPTextModel(CLIPConfig.from_json(d, with_projection=part == "text_encoder_2"))
                assert shapes(ours) == shapes_prefixed(ref_cls(transformers.CLIPTextConfig(**d)))


def shapes_prefixed(ref) -> dict:
    return {k: tuple(v.shape) for k, v in clip_state_dict(ref).items()}


def test_config_properties():
    unet = UNetConfig.from_json(json.loads((REFERENCE_CONFIGS / "sd-2.1-base/unet/config.json").read_text()))
    assert unet.num_attention_heads == (5, 10, 20, 20) and unet.use_linear_projection
    assert unet.transformer_layers_per_block == (1, 1, 1, 1) and unet.layers_per_block == (2, 2, 2, 2)
    assert unet.time_embed_dim == 1280 and unet.downscale_factor == 8 and not unet.is_sdxl
    xl = UNetConfig.from_json(json.loads((REFERENCE_CONFIGS / "sdxl-base-1.0/unet/config.json").read_text()))
    assert xl.is_sdxl and xl.transformer_layers_per_block == (1, 2, 10) and xl.cross_attention_dim == 2048
    vae = VAEConfig.from_json(json.loads((REFERENCE_CONFIGS / "sdxl-base-1.0/vae/config.json").read_text()))
    assert vae.downscale_factor == 8 and vae.scaling_factor == 0.13025 and vae.force_upcast
    clip = CLIPConfig.from_json(json.loads((REFERENCE_CONFIGS / "sd-1.5/text_encoder/config.json").read_text()))
    assert clip.hidden_act == "quick_gelu" and clip.head_dim == 64 and not clip.with_projection


SD15_UNET = json.loads((REFERENCE_CONFIGS / "sd-1.5/unet/config.json").read_text()) if REFERENCE_CONFIGS.exists() else {}


@pytest.mark.skipif(not SD15_UNET, reason="reference configs missing")
@pytest.mark.parametrize("field,value", [
    ("down_block_types", ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                          "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "KUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("class_embed_type", "timestep"),
    ("time_cond_proj_dim", 256),
    ("attention_type", "gated"),
    ("addition_embed_type", "text"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("cross_attention_dim", [768, 768, 768, 768]),
    ("act_fn", "gelu_tanh"),
])
def test_unet_config_errors(field, value):
    with pytest.raises(ValueError, match=field):
        UNetConfig.from_json(SD15_UNET | {field: value})


def test_other_config_errors():
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPConfig.from_json({"hidden_act": "relu"})
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_json({"block_out_channels": [8, 8], "down_block_types": ["DownEncoderBlock2D", "Foo"]})
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNetConfig.from_json(SD15_UNET | {"attention_head_dim": 7})
