"""An optional OpenVINO execution backend for the UNet on the CPU (`pip install openvino`).

    from sdlite import StableDiffusion
    from sdlite.openvino import use_openvino
    sd = use_openvino(StableDiffusion.from_pretrained(path))   # same calls, same images (fp32)

The UNet is converted once with `openvino.convert_model` (batch left free) and saved as OpenVINO
IR under `cache_dir` (default ~/.cache/sdlite/openvino), keyed by the weights, the config, the
latent size, the context length (the tokenizer's) and the library versions, so a later process
reads it instead of converting again.
Each UNet batch size is compiled once at a static shape, in fp32 (no reduced-precision hint).
The text encoder and the VAE stay in torch. The converted UNet holds its own copy of the
weights; the torch UNet is released.
"""

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .layers import ProjectedContext, context_rows, repeat_samples
from .loading import cache_folder


def weights_fingerprint(network: nn.Module) -> str:
    """A digest of the network's weights: every tensor's name, shape, dtype and a sample of its
    bytes (its first, middle and last 4 KiB), so a different checkpoint gets a different key
    without reading gigabytes."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        data = tensor.detach().reshape(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
        n = data.numel()
        for start in (0, n // 2, max(n - 4096, 0)):
            digest.update(data[start:start + 4096].numpy().tobytes())
    return digest.hexdigest()


class OpenVINOUNet(nn.Module):
    """Stands in for sdlite's UNet: the same call and `config`; computes with OpenVINO."""

    def __init__(self, unet: nn.Module, latent_size: tuple[int, int], context_length: int = 77,
                 cache_dir: Path | None = None, threads: int | None = None):
        super().__init__()
        import openvino as ov

        if unet.config.addition_embed_type is not None:
            raise ValueError("the OpenVINO backend supports SD 1.x / 2.x UNets (no SDXL added conditioning)")
        self.config = unet.config
        self.latent_size = tuple(latent_size)
        self.context_length = context_length  # tokens of the text conditioning (the tokenizer's length)
        self.threads = torch.get_num_threads() if threads is None else threads
        # One empty parameter so the pipeline reads the dtype (fp32) and device (cpu) as usual.
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)
        self.core = ov.Core()
        cache = cache_folder("openvino") if cache_dir is None else Path(cache_dir)
        key = hashlib.sha256(json.dumps({
            "weights": weights_fingerprint(unet), "config": repr(unet.config), "latent": self.latent_size,
            "context": context_length,
            "openvino": ov.__version__, "torch": torch.__version__,
        }).encode()).hexdigest()[:24]
        self.ir_path = cache / key / "unet.xml"
        self.converted = not self.ir_path.is_file()
        if self.converted:
            self.ir_path.parent.mkdir(parents=True, exist_ok=True)
            model = self._convert(unet, ov)
            tmp = self.ir_path.with_name("partial.xml")
            ov.save_model(model, tmp, compress_to_fp16=False)
            tmp.with_suffix(".bin").replace(self.ir_path.with_suffix(".bin"))
            tmp.replace(self.ir_path)
        self.model = self.core.read_model(self.ir_path)
        self.compiled = {}

    def _convert(self, unet, ov):
        h, w = self.latent_size
        c = self.config
        example = (torch.zeros(2, c.in_channels, h, w), torch.tensor(999.0),
                   torch.zeros(2, self.context_length, c.cross_attention_dim))
        # The batch dimension is left free so that it is not folded into reshapes; each batch
        # size is then fixed (static shapes) when it is compiled.
        shapes = [[-1, c.in_channels, h, w], [], [-1, self.context_length, c.cross_attention_dim]]
        with torch.no_grad():
            return ov.convert_model(unet.float(), example_input=example,
                                    input=[(shape, ov.Type.f32) for shape in shapes])

    def compiled_for(self, batch: int):
        """The UNet compiled for a batch size (fixed shape), compiling it on first use."""
        if batch not in self.compiled:
            h, w = self.latent_size
            c = self.config
            model = self.model.clone()
            model.reshape({0: [batch, c.in_channels, h, w], 2: [batch, self.context_length, c.cross_attention_dim]})
            self.compiled[batch] = self.core.compile_model(
                model, "CPU", {"INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": "f32"}
            )
        return self.compiled[batch]

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                added_cond: dict | None = None) -> torch.Tensor:
        if tuple(sample.shape[2:]) != self.latent_size:
            raise ValueError(f"this OpenVINO UNet was converted for {self.latent_size} latents, got "
                             f"{tuple(sample.shape[2:])}: call use_openvino again for another size")
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        if not bool((t == t[0]).all()):
            raise ValueError("the OpenVINO UNet takes one timestep for the whole batch")
        t = t[0]
        sample = repeat_samples(sample, context_rows(encoder_hidden_states))  # shared by the texts, as the UNet takes
        if isinstance(encoder_hidden_states, ProjectedContext):  # the projections are in the converted network
            encoder_hidden_states = encoder_hidden_states.states
        inputs = [sample.float().contiguous().numpy(), t.numpy(), encoder_hidden_states.float().contiguous().numpy()]
        out = self.compiled_for(sample.shape[0])(inputs)[0]
        return torch.from_numpy(out).to(sample.dtype)


def use_openvino(sd, height: int | None = None, width: int | None = None, cache_dir: Path | None = None,
                 threads: int | None = None):
    """Replace `sd`'s UNet by an OpenVINO one for images of height x width (default: the model's
    size); returns `sd`. CPU and fp32 only."""
    if sd.device.type != "cpu" or sd.dtype != torch.float32:
        raise ValueError("the OpenVINO backend runs on the CPU in float32: load the model with device='cpu', "
                         "dtype=torch.float32")
    latent = sd._latent_size(height, width)
    sd.unet = OpenVINOUNet(sd.unet, latent, sd.tokenizer.max_length, cache_dir, threads)
    return sd
