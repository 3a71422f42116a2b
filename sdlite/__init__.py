"""sdlite: a compact, fast, dependable Stable Diffusion engine in PyTorch.

    from sdlite import StableDiffusion
    sd = StableDiffusion.from_pretrained()          # the bundled model; or a diffusers-layout folder
    image = sd.text_to_image("a red circle on a blue background", seed=0)[0]

Importing the package is cheap: torch is loaded on first use of `StableDiffusion`.
"""

import os

# PyTorch backs CPU tensors of 2 MiB and more with transparent huge pages when this is set: one
# page fault per 2 MiB instead of per 4 KiB for every fresh activation (see sdlite.memory's
# set_malloc_policy). PyTorch reads it once, at its first such allocation, so it is set on import,
# before sdlite uses torch; THP_MEM_ALLOC_ENABLE=0 in the environment keeps it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
__all__ = ["StableDiffusion"]


def __getattr__(name: str):
    if name == "StableDiffusion":
        from .pipeline import StableDiffusion

        return StableDiffusion
    raise AttributeError(f"module 'sdlite' has no attribute {name!r}")
