"""Does the caption decide the shape? One-step predictions of the bundled model from noised real shapes.

    python training/diagnose_shape.py [--folder sdlite/data/bundled] [--scenes 24]

For large centred shapes (each shape equally often), the picture is encoded, noised to timestep t,
and the UNet predicts the clean picture in one step (v-prediction: x0 = sqrt(a) x_t - sqrt(1-a) v),
once with the scene's caption and once with a caption naming another shape. The decoded predictions
are graded by shapes.classify: how often the shape read is the one the caption names. Uses
diffusers' pipeline (the reference) to load the model.
"""

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OTHER = {"circle": "square", "square": "triangle", "triangle": "circle"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", type=Path, default=ROOT / "sdlite" / "data" / "bundled")
    p.add_argument("--scenes", type=int, default=24)
    p.add_argument("--timesteps", type=int, nargs="*", default=[300, 500, 700, 850])
    args = p.parse_args(argv)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.folder, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    alphas = pipe.scheduler.alphas_cumprod
    scale = pipe.vae.config.scaling_factor
    rng = random.Random(5)
    follows = {}  # (t, caption kind) -> [shape read == shape named]
    with torch.no_grad():
        for n in range(args.scenes):
            fg = rng.choice([c for c in shapes.COLORS if c != "black"])
            scene = shapes.Scene(fg, shapes.SHAPES[n % 3], "black", "center", "large")
            pixels = torch.from_numpy(np.asarray(shapes.render(scene))).permute(2, 0, 1)[None].float() / 127.5 - 1
            x0 = pipe.vae.encode(pixels).latent_dist.mean * scale
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(n))
            named = {"right": scene.shape, "other": OTHER[scene.shape]}
            captions = [shapes.Scene(fg, named[k], "black").caption() for k in named]
            ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            context = pipe.text_encoder(ids)[0]
            for t in args.timesteps:
                a = alphas[t]
                xt = (a.sqrt() * x0 + (1 - a).sqrt() * noise).repeat(2, 1, 1, 1)
                v = pipe.unet(xt, torch.tensor([t, t]), context).sample
                decoded = pipe.vae.decode((a.sqrt() * xt - (1 - a).sqrt() * v) / scale).sample
                images = ((decoded + 1) * 127.5).clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()
                for image, kind in zip(images, named):
                    read = shapes.classify(Image.fromarray(image)).shape
                    follows.setdefault((t, kind), []).append(read == named[kind])
    print("| t | right caption | other shape's caption: follows the caption |\n|---|---:|---:|")
    for t in args.timesteps:
        print(f"| {t} | {np.mean(follows[t, 'right']):.0%} | {np.mean(follows[t, 'other']):.0%} |")


if __name__ == "__main__":
    main()
