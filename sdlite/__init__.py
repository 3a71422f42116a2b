"""sdlite: a compact, fast, dependable Stable Diffusion engine in PyTorch.

    from sdlite import StableDiffusion
    sd = StableDiffusion.from_pretrained()          # the bundled model; or a diffusers-layout folder
    image = sd.text_to_image("a red circle on a blue background", seed=0)[0]

Importing the package is cheap: torch is loaded on first use of `StableDiffusion`.
"""

__version__ = "0.1.0"
__all__ = ["StableDiffusion"]


def __getattr__(name: str):
    if name == "StableDiffusion":
        from .pipeline import StableDiffusion

        return StableDiffusion
    raise AttributeError(f"module 'sdlite' has no attribute {name!r}")
