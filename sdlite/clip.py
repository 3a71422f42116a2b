"""CLIP text encoder (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"), as Stable Diffusion uses it: a causal pre-LayerNorm transformer over
token ids. Weight names match transformers' CLIPTextModel / CLIPTextModelWithProjection
(`text_model.encoder.layers.0.self_attn.q_proj.weight`, `text_projection.weight`)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig
from .layers import Linear, unpacked


@dataclass
class CLIPOutput:
    last_hidden_state: torch.Tensor  # (B, T, D) after the final LayerNorm (SD 1.x/2.x conditioning)
    penultimate_hidden_state: torch.Tensor  # (B, T, D) input of the last layer, no final norm (SDXL, clip skip)
    pooled_output: torch.Tensor  # (B, D) final-normed state at the eos token
    text_embeds: torch.Tensor | None = None  # (B, projection_dim) text_projection(pooled), with a projection


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        D = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)
        self.quick_gelu = config.hidden_act == "quick_gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.quick_gelu else F.gelu(x)
        return self.fc2(x)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        # Passing the (empty) weight skips nn.Embedding's random init: weights are always loaded,
        # and normal_ on the meta device imports sympy (1.5 s and 70 MB of a cold start).
        self.token_embedding = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.position_embedding = nn.Embedding(
            config.max_position_embeddings,
            config.hidden_size,
            _weight=torch.empty(config.max_position_embeddings, config.hidden_size),
        )
        # No position_ids buffer: positions are 0..T-1, computed in forward (old checkpoints'
        # `text_model.embeddings.position_ids` must be dropped by the loader).

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:T]  # (B, T, D)


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """Text encoder; with `config.with_projection` it is SDXL's CLIPTextModelWithProjection."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.with_projection:
            self.text_projection = Linear(config.hidden_size, config.projection_dim, bias=False)
        unpacked(self)  # run once per image: oneDNN on the plain weights (`Linear`)

    def forward(self, input_ids: torch.Tensor) -> CLIPOutput:
        """input_ids: (B, T) token ids, T <= max_position_embeddings. Causal mask, no padding mask
        (SD pipelines pad with a fixed token and attend to it)."""
        tm = self.text_model
        x = tm.embeddings(input_ids)  # (B, T, D)
        *layers, last = tm.encoder.layers
        for layer in layers:
            x = layer(x)
        penultimate = x
        x = tm.final_layer_norm(last(x))
        # transformers' rule: the first eos token; configs with the old eos_token_id=2 take the
        # highest token id instead (the eos id 49407 is the largest in CLIP's vocabulary).
        if self.config.eos_token_id == 2:
            eos = input_ids.argmax(dim=-1)
        else:
            eos = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eos]  # (B, D)
        text_embeds = self.text_projection(pooled) if self.config.with_projection else None
        return CLIPOutput(x, penultimate, pooled, text_embeds)
