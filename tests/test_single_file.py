"""Single-file checkpoints: architecture detection, loading, `convert` and clear errors.

The tiny models follow their family's rules (reference_models.build_family_model) and are written
in the original layout by sdlite's converter; diffusers' own `from_single_file` reading the same
file must give the folder's tensors bit for bit, so the converter is checked independently.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdlite import StableDiffusion
from sdlite import keys
from sdlite.images import read_png_text
from sdlite.loading import CheckpointError, find_weight_files, read_weights
from sdlite.single_file import read_single_file, save_diffusers_folder, save_single_file

diffusers = pytest.importorskip("diffusers")

KINDS = ["sd1", "sd2", "sdxl"]
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
COMPONENTS = {"sd1": ("unet", "vae", "text_encoder"), "sd2": ("unet", "vae", "text_encoder"),
              "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}


def folder_tensors(folder, component):
    state = {}
    for path in find_weight_files(folder / component):
        state.update(read_weights(path))
    return keys.canonical_state(state, "CLIPTextModel" if component.startswith("text") else component)


def max_pixel_diff(ours, theirs) -> int:
    a = np.stack([np.asarray(im, dtype=np.int16) for im in ours])
    b = np.stack([np.asarray(im, dtype=np.int16) for im in theirs])
    return int(np.abs(a - b).max())


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_reads_our_single_file_as_the_folder(family_model, kind):
    folder, single = family_model(kind)
    cls = getattr(diffusers, PIPELINES[kind])
    theirs = cls.from_single_file(str(single), config=str(folder), local_files_only=True)
    reference = cls.from_pretrained(folder)
    for component in COMPONENTS[kind]:
        a, b = getattr(theirs, component).state_dict(), getattr(reference, component).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in b), component


@pytest.mark.parametrize("kind", KINDS)
def test_single_file_detection_and_weights(family_model, kind):
    folder, single = family_model(kind)
    model = read_single_file(single)
    assert model.family == kind
    for component in COMPONENTS[kind]:
        expected = folder_tensors(folder, component)
        got = model.weights[component]
        assert got.keys() == expected.keys(), component
        assert all(torch.equal(got[k], expected[k]) for k in expected), component
    unet = model.configs["unet"]
    reference_unet = diffusers.UNet2DConditionModel.load_config(folder / "unet")
    for field in ("block_out_channels", "down_block_types", "up_block_types", "cross_attention_dim",
                  "use_linear_projection", "attention_head_dim", "addition_time_embed_dim"):
        assert np.array_equal(np.atleast_1d(unet.get(field)), np.atleast_1d(reference_unet.get(field))), field
    assert model.configs["scheduler"]["prediction_type"] == "epsilon"


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_single_file_images_match_folder_and_diffusers(family_model, kind):
    folder, single = family_model(kind)
    ours = StableDiffusion.from_pretrained(single)
    assert ours.name == kind
    args = dict(negative_prompt="blurry", n_images=2, steps=4, cfg=7.5, seed=3, sampler="euler_a",
                height=64, width=64)
    from_file = ours.text_to_image("a red circle", **args)
    from_folder = StableDiffusion.from_pretrained(folder).text_to_image("a red circle", **args)
    # The weights are bit-identical; memory-mapped tensors sit at other alignments in the two
    # files, which can change a float rounding (UNet outputs agree to ~1e-6).
    assert max_pixel_diff(from_file, from_folder) <= 1
    reference = diffusers.StableDiffusionPipeline.from_single_file(str(single), config=str(folder),
                                                                    local_files_only=True)
    reference.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    theirs = reference("a red circle", negative_prompt="blurry", num_images_per_prompt=2, num_inference_steps=4,
                       guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(3), height=64,
                       width=64).images
    assert max_pixel_diff(from_file, theirs) <= 2


@pytest.mark.parametrize("kind", KINDS)
def test_convert_round_trips_exactly(family_model, kind, tmp_path):
    folder, single = family_model(kind)
    assert save_diffusers_folder(single, tmp_path / "folder") == kind
    assert save_single_file(tmp_path / "folder", tmp_path / "again.safetensors") == kind
    for component in COMPONENTS[kind]:  # folder -> file -> folder: the same tensors
        a, b = folder_tensors(folder, component), folder_tensors(tmp_path / "folder", component)
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), component
    first, second = load_file(single), load_file(tmp_path / "again.safetensors")  # file -> folder -> file
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # and the converted folder is a model sdlite loads
    StableDiffusion.from_pretrained(tmp_path / "folder")


@pytest.mark.parametrize("resblocks", [23, 24])
def test_sd2_drops_only_a_24th_openclip_layer(family_model, tmp_path, resblocks):
    """SD 2.x uses 23 of OpenCLIP-H's 24 layers. Published files carry all 24, and so do the files
    sdlite writes; diffusers' own converter writes only the 23, and its from_single_file skips
    `resblocks.23` alone. Other layer counts (the tiny models) are kept whole."""
    _, single = family_model("sd2")
    prefix = "cond_stage_model.model.transformer.resblocks."
    state = load_file(single)
    assert {k.split(".")[4] for k in state if k.startswith(prefix)} == {"0", "1"}
    assert read_single_file(single).configs["text_encoder"]["num_hidden_layers"] == 2
    layer = {k.removeprefix(prefix + "1."): v for k, v in state.items() if k.startswith(prefix + "1.")}
    state |= {f"{prefix}{i}.{k}": v.clone() for i in range(2, resblocks) for k, v in layer.items()}
    save_file(state, tmp_path / "sd2.safetensors")
    model = read_single_file(tmp_path / "sd2.safetensors")
    assert model.configs["text_encoder"]["num_hidden_layers"] == 23
    assert len({k.split(".")[3] for k in model.weights["text_encoder"] if ".layers." in k}) == 23
    save_diffusers_folder(tmp_path / "sd2.safetensors", tmp_path / "folder")
    save_single_file(tmp_path / "folder", tmp_path / "again.safetensors")
    assert len({k.split(".")[4] for k in load_file(tmp_path / "again.safetensors") if k.startswith(prefix)}) == 24


def test_key_tables_work_in_both_directions(family_model):
    folder, _ = family_model("sd1")
    config = read_single_file(family_model("sd1")[1])
    from sdlite.config import UNetConfig

    unet = UNetConfig.from_json(config.configs["unet"])
    table = keys.unet_table(unet)
    for diffusers_name, original in [
        ("down_blocks.1.resnets.0.conv1.weight", "input_blocks.4.0.in_layers.2.weight"),
        ("down_blocks.0.downsamplers.0.conv.bias", "input_blocks.3.0.op.bias"),
        ("up_blocks.1.attentions.2.proj_out.weight", "output_blocks.5.1.proj_out.weight"),
        ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
        ("up_blocks.1.upsamplers.0.conv.weight", "output_blocks.5.2.conv.weight"),
        ("mid_block.resnets.1.time_emb_proj.bias", "middle_block.2.emb_layers.1.bias"),
    ]:
        assert keys.rename(diffusers_name, table, to_original=True) == original
        assert keys.rename(original, table, to_original=False) == diffusers_name


def test_prediction_type_marker_and_override(family_model, tmp_path):
    _, single = family_model("sd2")
    state = load_file(single)
    assert read_single_file(single, prediction_type="v_prediction").configs["scheduler"]["prediction_type"] == "v_prediction"
    save_file(state | {"v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, tmp_path / "v.safetensors")
    model = read_single_file(tmp_path / "v.safetensors")
    assert model.reference == "sd-2.1-768-v"
    assert model.configs["scheduler"]["prediction_type"] == "v_prediction"
    assert model.configs["scheduler"]["rescale_betas_zero_snr"] is True
    sd = StableDiffusion.from_pretrained(single, prediction_type="v_prediction")
    assert sd.schedule.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        read_single_file(single, prediction_type="sample")


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_zero_snr_files_default_to_a_sampler_that_takes_them(family_model, tmp_path, kind):
    """SD 1.x's PNDM refuses zero terminal SNR: such files default to Euler."""
    state = load_file(family_model(kind)[1])
    for markers in ({"ztsnr"}, {"ztsnr", "v_pred"}):
        save_file(state | {m: torch.zeros(0) for m in markers}, tmp_path / "z.safetensors")
        sd = StableDiffusion.from_pretrained(tmp_path / "z.safetensors")
        assert sd.default_sampler == "euler" and sd.schedule.rescale_betas_zero_snr
        assert len(sd.text_to_image("a cat", steps=2)) == 1


def test_not_a_checkpoint_says_which_keys_were_expected(tmp_path):
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"not a Stable Diffusion checkpoint: expected keys model\.diffusion_model"):
        StableDiffusion.from_pretrained(tmp_path / "other.safetensors")


def test_unknown_architecture(family_model, tmp_path):
    _, single = family_model("sd1")
    state = {k: v for k, v in load_file(single).items() if not k.startswith("cond_stage_model.")}
    save_file(state, tmp_path / "no_text.safetensors")
    with pytest.raises(CheckpointError, match="unknown architecture"):
        read_single_file(tmp_path / "no_text.safetensors")
    # SD 1.x text encoder keys on an SD 2.x-shaped UNet (linear projections): the shapes disagree
    sd2 = load_file(family_model("sd2")[1])
    mixed = {k: v for k, v in sd2.items() if not k.startswith("cond_stage_model.")}
    mixed |= {k: v for k, v in load_file(single).items() if k.startswith("cond_stage_model.")}
    save_file(mixed, tmp_path / "mixed.safetensors")
    with pytest.raises(CheckpointError, match="unknown architecture.*does not fit"):
        read_single_file(tmp_path / "mixed.safetensors")
    # SD 2.x unCLIP: a class embedding (label_emb) for the image embedding
    unclip = sd2 | {"model.diffusion_model.label_emb.0.0.weight": torch.zeros(128, 1024),
                    "model.diffusion_model.label_emb.0.0.bias": torch.zeros(128)}
    save_file(unclip, tmp_path / "unclip.safetensors")
    with pytest.raises(CheckpointError, match="unknown architecture.*label_emb"):
        read_single_file(tmp_path / "unclip.safetensors")


@pytest.mark.parametrize("key", ["input_blocks.0.0.weight", "out.2.weight"])
def test_a_unet_without_its_first_or_last_conv_is_incomplete(family_model, tmp_path, key):
    state = load_file(family_model("sd1")[1])
    del state["model.diffusion_model." + key]
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="not a complete SD 1.x checkpoint"):
        read_single_file(tmp_path / "partial.safetensors")


def test_pickle_needs_the_opt_in(family_model, tmp_path):
    _, single = family_model("sd1")
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(single)}, path)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        StableDiffusion.from_pretrained(path)
    sd = StableDiffusion.from_pretrained(path, allow_pickle=True)
    assert sd.unet.config.block_out_channels == (32, 64, 64)


def test_cli_convert_generate_and_lora(family_model, tmp_path, capsys):
    from sdlite.cli import main

    folder, _ = family_model("sd1")
    single = tmp_path / "model.safetensors"
    assert main(["convert", str(folder), str(single)]) == 0
    assert main(["convert", str(single), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "model_index.json").is_file()
    assert main(["convert", str(folder), str(single)]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    # a LoRA: one random update of an attention projection
    lora = tmp_path / "lora.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
    save_file({f"{name}.lora_down.weight": torch.randn(2, 32), f"{name}.lora_up.weight": torch.randn(32, 2)}, lora)
    args = ["generate", "a cat", "--model", str(single), "--steps", "2", "--height", "64", "--width", "64",
            "--seed", "1", "--quiet"]
    assert main(args + ["-o", str(tmp_path / "plain.png")]) == 0
    assert main(args + ["-o", str(tmp_path / "lora.png"), "--lora", f"{lora}:0.8",
                        "--prediction-type", "epsilon"]) == 0
    record = json.loads(read_png_text(tmp_path / "lora.png")["sdlite"])
    assert record["settings"]["loras"] == [[str(lora), 0.8]]
    assert record["settings"]["prediction_type"] == "epsilon"
    plain, merged = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("plain", "lora"))
    assert not np.array_equal(plain, merged)
    pickle = tmp_path / "model.ckpt"
    torch.save(load_file(single), pickle)
    assert main(args + ["--model", str(pickle), "-o", str(tmp_path / "p.png")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(args + ["--model", str(pickle), "-o", str(tmp_path / "p.png"), "--allow-pickle"]) == 0


def test_convert_keeps_the_prediction_type_and_zero_snr_as_marker_keys(family_model, tmp_path):
    folder = tmp_path / "v"
    shutil.copytree(family_model("sd2")[0], folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"prediction_type": "v_prediction",
                                                                 "rescale_betas_zero_snr": True}))
    save_single_file(folder, tmp_path / "v.safetensors")
    assert {"v_pred", "ztsnr"} <= set(load_file(tmp_path / "v.safetensors"))
    schedule = read_single_file(tmp_path / "v.safetensors").configs["scheduler"]
    assert schedule["prediction_type"] == "v_prediction" and schedule["rescale_betas_zero_snr"]
    save_single_file(family_model("sd2")[0], tmp_path / "eps.safetensors")
    assert not {"v_pred", "ztsnr"} & set(load_file(tmp_path / "eps.safetensors"))


def test_convert_reads_text_encoder_configs_as_the_loader_does(family_model, tmp_path):
    """Keys left out of a config take CLIP's defaults (77 positions, 49408 tokens), as when loading."""
    folder = tmp_path / "sd1"
    shutil.copytree(family_model("sd1")[0], folder)
    path = folder / "text_encoder" / "config.json"
    config = json.loads(path.read_text())
    del config["vocab_size"], config["max_position_embeddings"]
    path.write_text(json.dumps(config))
    assert save_single_file(folder, tmp_path / "sd1.safetensors") == "sd1"


def test_convert_refuses_a_model_whose_text_needs_its_own_tokenizer(tmp_path):
    """The bundled model reads 16 tokens of its own small vocabulary; a single file would lose it."""
    from sdlite.pipeline import BUNDLED_MODEL

    with pytest.raises(CheckpointError, match="takes 16 tokens of a .*carries no tokenizer"):
        save_single_file(BUNDLED_MODEL, tmp_path / "bundled.safetensors")
    assert not (tmp_path / "bundled.safetensors").exists()


def test_convert_refuses_a_palettized_folder(family_model, tmp_path):
    from sdlite.palettize import compress

    compress(family_model("sd1")[0], tmp_path / "pal", bits=8, log=None)
    with pytest.raises(CheckpointError, match="is palettized"):
        save_single_file(tmp_path / "pal", tmp_path / "pal.safetensors")


def test_real_world_extras_are_ignored(family_model, tmp_path):
    """Published files carry EMA copies, schedule buffers, position ids, OpenCLIP's logit scale and
    text projection (SD 2.x), the VAE's training loss, fp16 tensors, and old CLIP names without
    `text_model.`."""
    _, single = family_model("sd1")
    state = load_file(single)
    old_names = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v.half()
                 for k, v in state.items()}
    extras = {"model_ema.decay": torch.tensor(0.9999), "alphas_cumprod": torch.ones(1000),
              "first_stage_model.loss.logvar": torch.zeros(()),
              "cond_stage_model.transformer.embeddings.position_ids": torch.arange(77)[None]}
    save_file(old_names | extras, tmp_path / "sd1.safetensors")
    sd = StableDiffusion.from_pretrained(tmp_path / "sd1.safetensors")
    assert sd.text_encoder.text_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float32
    _, single2 = family_model("sd2")
    state2 = load_file(single2) | {"cond_stage_model.model.logit_scale": torch.tensor(4.6),
                                   "cond_stage_model.model.text_projection": torch.randn(64, 64)}
    save_file(state2, tmp_path / "sd2.safetensors")
    assert read_single_file(tmp_path / "sd2.safetensors").weights["text_encoder"].keys() == \
        read_single_file(single2).weights["text_encoder"].keys()


def test_convert_reads_legacy_vae_attention_names(family_model, tmp_path):
    import shutil

    folder, single = family_model("sd1")
    legacy = tmp_path / "legacy"
    shutil.copytree(folder, legacy)
    vae_file = legacy / "vae" / "diffusion_pytorch_model.safetensors"
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, tensor in load_file(vae_file).items():
        for new, old in names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        state[key] = tensor
    save_file(state, vae_file)
    save_single_file(legacy, tmp_path / "legacy.safetensors")
    first, second = load_file(single), load_file(tmp_path / "legacy.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("reference", ["sd-1.5", "sd-2.1-base", "sdxl-base-1.0"])
def test_full_size_layouts_match_diffusers_conversion(reference):
    """The real architectures, on the meta device (no weights): a full-size model written in the
    original layout is detected with its reference config, and diffusers' own converters map its
    UNet and VAE keys to the same tensors as sdlite's tables."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from sdlite.clip import CLIPTextModel
    from sdlite.loading import read_json
    from sdlite.single_file import CONFIGS, describe, detect_family, network_configs
    from sdlite.unet import UNet2DConditionModel
    from sdlite.vae import AutoencoderKL

    folder = CONFIGS / reference
    jsons = {c: read_json(folder / c / "config.json") for c in ("unet", "vae", "text_encoder", "text_encoder_2")
             if (folder / c).is_dir()}
    configs = network_configs(jsons)
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModel}
    with torch.device("meta"):
        states = {c: classes[c](configs[c]).state_dict() for c in configs}
    family = {"sd-1.5": "sd1", "sd-2.1-base": "sd2", "sdxl-base-1.0": "sdxl"}[reference]
    original = keys.diffusers_to_original(states, family, configs)
    assert detect_family(original, "meta") == family
    model = describe(original, family, None, "meta")
    assert model.reference == reference
    for component, config in network_configs(model.configs).items():
        expected = configs[component]
        if component.startswith("text"):  # projection_dim only matters with a projection
            expected = expected.__class__(**{**expected.__dict__, "projection_dim": config.projection_dim})
        assert config == expected, component
    for component, state in states.items():
        assert model.weights[component].keys() == state.keys(), component
    unet = {k: v for k, v in original.items() if k.startswith("model.diffusion_model.")}
    theirs = convert_ldm_unet_checkpoint(unet, jsons["unet"])
    assert theirs.keys() == model.weights["unet"].keys()
    assert all(theirs[k] is model.weights["unet"][k] for k in theirs)
    vae = {k: v for k, v in original.items() if k.startswith("first_stage_model.")}
    theirs = convert_ldm_vae_checkpoint(vae, jsons["vae"])
    assert theirs.keys() == model.weights["vae"].keys()
