"""Weight files: safetensors parsing, file discovery, strict loading and clear errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sdlite import StableDiffusion
from sdlite.config import CLIPConfig, UNetConfig, VAEConfig
from sdlite.keys import canonical_state
from sdlite.loading import (
    CheckpointError,
    find_weight_files,
    load_component,
    load_network,
    read_safetensors,
    read_weights,
)


class Tiny(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)


def tiny_weights(dtype=torch.float32):
    torch.manual_seed(0)
    return {k: v.to(dtype) for k, v in Tiny().state_dict().items()}


def test_read_safetensors_matches_the_reference_reader(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).half(),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randn(2, 2).bfloat16(),
        "empty": torch.zeros(0, 4),
        "u16": torch.tensor([1, 65535]).to(torch.uint16),
        "u32": torch.tensor([1, 2**32 - 1]).to(torch.uint32),
    }
    save_file(tensors, path)
    ours, theirs = read_safetensors(path), load_file(path)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype
        assert torch.equal(ours[key], theirs[key])


def test_tensors_are_writable_without_touching_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4)}, path)
    read_safetensors(path)["a"].add_(1)
    assert torch.equal(read_safetensors(path)["a"], torch.zeros(4))


def test_truncated_file_names_the_file_and_tensor(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"weight": torch.randn(100, 100)}, path)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"w\.safetensors is truncated or corrupt.*'weight'"):
        read_safetensors(path)


def test_overlapping_tensors_are_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.ones(4)}, path)
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header["b"]["data_offsets"] = [8, 24]  # half of a's bytes
    text = json.dumps(header, separators=(",", ":")).encode().ljust(size)  # the data stays where it was
    path.write_bytes(data[:8] + text + data[8 + size:])
    with pytest.raises(CheckpointError, match=r"'a' and 'b' overlap"):
        read_safetensors(path)


@pytest.mark.parametrize("content", [b"", b"abc", b"\xff" * 64, (20).to_bytes(8, "little") + b"{not json}" * 2])
def test_garbage_is_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        read_safetensors(path)


def test_find_weight_files_prefers_the_requested_precision(tmp_path):
    save_file(tiny_weights(), tmp_path / "model.safetensors")
    save_file(tiny_weights(torch.float16), tmp_path / "model.fp16.safetensors")
    assert find_weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    assert find_weight_files(tmp_path, prefer_fp16=True) == [tmp_path / "model.fp16.safetensors"]
    (tmp_path / "model.safetensors").unlink()
    assert find_weight_files(tmp_path) == [tmp_path / "model.fp16.safetensors"]


def test_sharded_weights_load_as_one(tmp_path):
    weights = tiny_weights()
    names = sorted(weights)
    save_file({k: weights[k] for k in names[:2]}, tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors")
    save_file({k: weights[k] for k in names[2:]}, tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors")
    weight_map = {k: f"diffusion_pytorch_model-0000{1 + (i >= 2)}-of-00002.safetensors" for i, k in enumerate(names)}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_component(Tiny, None, tmp_path, torch.float32)
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value)


@pytest.mark.parametrize("index", ["diffusion_pytorch_model.safetensors.index.fp16.json",  # diffusers' name
                                   "diffusion_pytorch_model.fp16.safetensors.index.json"])
def test_sharded_fp16_weights_are_found_under_either_index_name(tmp_path, index):
    save_file(tiny_weights(), tmp_path / "diffusion_pytorch_model.safetensors")
    shard = "diffusion_pytorch_model.fp16-00001-of-00001.safetensors"
    save_file(tiny_weights(torch.float16), tmp_path / shard)
    (tmp_path / index).write_text(json.dumps({"weight_map": dict.fromkeys(tiny_weights(), shard)}))
    assert find_weight_files(tmp_path, prefer_fp16=True) == [tmp_path / shard]
    assert find_weight_files(tmp_path) == [tmp_path / "diffusion_pytorch_model.safetensors"]


def safetensors_header(folder, header: bytes):
    path = folder / "w.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    return path


def pickled(folder, value):
    torch.save(value, folder / "w.ckpt")
    return folder / "w.ckpt"


def with_index(folder, text: str):
    (folder / "model.safetensors.index.json").write_text(text)
    return folder


UNET = {"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2}


@pytest.mark.parametrize("make, read, message", [
    (lambda d: safetensors_header(d, b"[1]"), read_safetensors, "header is not a json object"),
    (lambda d: safetensors_header(d, b'{"a": {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]}}'),
     read_safetensors, "negative size"),
    (lambda d: safetensors_header(d, b'{"a": {"dtype": "X7", "shape": [1], "data_offsets": [0, 4]}}'),
     read_safetensors, "dtype 'X7', which sdlite does not read"),
    (lambda d: with_index(d, "[]"), find_weight_files, "not a shard index"),
    (lambda d: pickled(d, torch.zeros(3)), read_weights, r"holds no state dict \(a Tensor\)"),
    (lambda d: pickled(d, [1, 2]), read_weights, r"holds no state dict \(a list\)"),
    (lambda d: {}, UNetConfig.from_json, "needs down_block_types"),
    (lambda d: {}, VAEConfig.from_json, "needs block_out_channels"),
    (lambda d: UNET | {"attention_head_dim": None}, UNetConfig.from_json, "positive integers, got None"),
    (lambda d: UNET | {"attention_head_dim": 0}, UNetConfig.from_json, "positive integers, got 0"),
    (lambda d: {"num_attention_heads": 0}, CLIPConfig.from_json, "num_attention_heads=0"),
], ids=["header-list", "negative-shape", "unknown-dtype", "index-list", "pickled-tensor", "pickled-list",
        "unet-no-blocks", "vae-no-blocks", "unet-heads-null", "unet-heads-0", "clip-heads-0"])
def test_malformed_inputs_give_clear_errors(tmp_path, make, read, message):
    with pytest.raises(ValueError, match=message):
        read(make(tmp_path))


def test_pickle_weights_need_the_opt_in(tmp_path):
    torch.save(tiny_weights(), tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        find_weight_files(tmp_path)
    model = load_component(Tiny, None, tmp_path, torch.float32, allow_pickle=True)
    assert torch.equal(model.proj.weight, tiny_weights()["proj.weight"])


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing model component folder"):
        find_weight_files(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no weight file \(\*\.safetensors\) in"):
        find_weight_files(tmp_path)


def meta_tiny():
    with torch.device("meta"):
        return Tiny()


def test_load_network_casts_and_shares_memory():
    weights = tiny_weights()
    model = load_network(meta_tiny(), weights, "test", torch.float32)
    assert model.proj.weight.data_ptr() == weights["proj.weight"].data_ptr()  # fp32 -> fp32: no copy
    half = load_network(meta_tiny(), weights, "test", torch.float16)
    assert half.proj.weight.dtype == torch.float16
    assert not any(p.requires_grad for p in model.parameters())


def test_shape_mismatch_names_key_and_shapes():
    weights = tiny_weights()
    weights["proj.weight"] = torch.zeros(3, 5)
    with pytest.raises(CheckpointError, match=r"'proj\.weight' has shape \(3, 5\), the config needs \(3, 4\)"):
        load_network(meta_tiny(), weights, "test", torch.float32)


def test_missing_and_unexpected_keys_are_named():
    weights = tiny_weights()
    del weights["norm.bias"]
    weights["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 missing \(first: norm\.bias\); 1 unexpected \(first: extra\.weight\)"):
        load_network(meta_tiny(), weights, "test", torch.float32)


def test_legacy_vae_attention_names_are_mapped():
    legacy = {
        "encoder.mid_block.attentions.0.query.weight": torch.zeros(8, 8, 1, 1),
        "encoder.mid_block.attentions.0.proj_attn.bias": torch.zeros(8),
        "text_model.embeddings.position_ids": torch.arange(77)[None],
    }
    state = canonical_state(legacy, "AutoencoderKL")
    assert set(state) == {"encoder.mid_block.attentions.0.to_q.weight", "encoder.mid_block.attentions.0.to_out.0.bias"}
    assert state["encoder.mid_block.attentions.0.to_q.weight"].shape == (8, 8)


def test_clip_keys_without_the_text_model_prefix_are_mapped():
    state = canonical_state({"encoder.layers.0.mlp.fc1.weight": torch.zeros(1), "text_projection.weight": torch.zeros(1)}, "CLIPTextModel")
    assert set(state) == {"text_model.encoder.layers.0.mlp.fc1.weight", "text_projection.weight"}
    assert set(canonical_state({"encoder.conv_in.weight": torch.zeros(1)}, "AutoencoderKL")) == {"encoder.conv_in.weight"}


def test_from_pretrained_errors_name_the_path(tmp_path, reference_model):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        StableDiffusion.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        StableDiffusion.from_pretrained(tmp_path)
    folder = tmp_path / "model"
    shutil.copytree(reference_model("sd1"), folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weight file .* in .*unet"):
        StableDiffusion.from_pretrained(folder)


def copy_with_config(source, folder, component: str, **changes):
    """A copy of the model folder `source` whose `component` config.json has `changes`."""
    shutil.copytree(source, folder)
    config_path = folder / component / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | changes))
    return folder


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, reference_model):
    folder = copy_with_config(reference_model("sd1"), tmp_path / "model", "unet", cross_attention_dim=48)
    with pytest.raises(CheckpointError, match=r"unet.*attn2\.to_k\.weight' has shape \(\d+, 32\), the config needs \(\d+, 48\)"):
        StableDiffusion.from_pretrained(folder)


def test_a_tokenizer_larger_than_the_text_encoder_is_refused(tmp_path, reference_model):
    folder = copy_with_config(reference_model("sd1"), tmp_path / "model", "text_encoder", vocab_size=1000)
    weights_path = folder / "text_encoder" / "model.safetensors"
    weights = load_file(weights_path)
    weights = {k: v[:1000] if "token_embedding" in k else v for k, v in weights.items()}
    save_file(weights, weights_path)
    with pytest.raises(CheckpointError, match="tokenizer has ids up to 49407 but the text encoder has only 1000"):
        StableDiffusion.from_pretrained(folder)


def test_corrupt_weight_file_is_reported(tmp_path, reference_model):
    folder = tmp_path / "model"
    shutil.copytree(reference_model("sd1"), folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"vae.*truncated or corrupt"):
        StableDiffusion.from_pretrained(folder)


def test_fp16_model_loads_from_fp16_variant(tmp_path, reference_model):
    folder = tmp_path / "model"
    shutil.copytree(reference_model("sd1"), folder)
    unet_dir = folder / "unet"
    weights = load_file(unet_dir / "diffusion_pytorch_model.safetensors")
    save_file({k: v.half() for k, v in weights.items()}, unet_dir / "diffusion_pytorch_model.fp16.safetensors")
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    sd = StableDiffusion.from_pretrained(folder)  # fp16 file, fp32 model
    assert sd.unet.conv_in.weight.dtype == torch.float32
    sd16 = StableDiffusion.from_pretrained(folder, dtype=torch.bfloat16)
    assert sd16.unet.conv_in.weight.dtype == torch.bfloat16
    next(sd16.generate_latents("a cat", steps=1, seed=0))
