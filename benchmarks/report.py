"""Benchmark results -> JSON, a Markdown table and a PNG bar chart (drawn with PIL)."""

import json
from pathlib import Path

# (key, label, unit, lower is better); "gflops" and "img/s@n" rows are derived in `rows`.
METRICS = [
    ("import_s", "import", "s", True),
    ("load_s", "load", "s", True),
    ("convert_s", "of which UNet conversion", "s", True),
    ("cold_start_s", "cold start (spawn to ready)", "s", True),
    ("text_encoding_s", "text encoding", "s", True),
    ("unet_first_step_s", "UNet first step", "s", True),
    ("unet_step_s", "UNet step (median)", "s", True),
    ("vae_decode_s", "VAE decode", "s", True),
    ("end_to_end_s", "end to end", "s", True),
    ("first_image_s", "spawn to first image", "s", True),
    ("peak_rss_mb", "peak RSS", "MB", True),
    ("peak_gpu_mb", "peak GPU memory", "MB", True),
]
COLOURS = {"sdlite": (46, 125, 50), "sdlite-low-memory": (129, 199, 132), "diffusers": (120, 120, 120),
           "openvino": (21, 101, 192)}


def rows(results: dict) -> list[tuple[str, str, bool, dict]]:
    """(label, unit, lower is better, {engine: value}) for every figure the engines report."""
    engines = results["engines"]
    flops = results["unet_flops"]
    peak = results["machine"]["gemm_peak_gflops"]
    out = []
    for key, label, unit, lower in METRICS:
        values = {e: r[key] for e, r in engines.items() if r.get(key) is not None}
        if values:
            out.append((label, unit, lower, values))
    one = min(int(n) for n in flops)
    gflops = {e: flops[str(one)] / r["unet_step_s"] / 1e9 for e, r in engines.items()}
    out.append(("UNet GFLOP/s", "GFLOP/s", False, gflops))
    out.append(("UNet share of matmul peak", "%", False, {e: 100 * g / peak for e, g in gflops.items()}))
    batches = sorted({int(n) for r in engines.values() for n in r["unet_images_per_s"]})
    for n in batches:
        values = {e: r["unet_images_per_s"][str(n)] for e, r in engines.items() if str(n) in r["unet_images_per_s"]}
        out.append((f"UNet img/s at batch {n} (CFG)", "img/s", False, values))
    return out


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def gemm_sources(machine: dict) -> str:
    """The probe's GEMM rates, e.g. 'torch.mm 215, oneDNN 494 GFLOP/s; ', when it timed more than one."""
    gemms = machine.get("gemm_gflops", {})
    if len(gemms) < 2:
        return ""
    return ", ".join(f"{name} {gflops:.0f}" for name, gflops in gemms.items()) + " GFLOP/s; "


def markdown(results: dict) -> str:
    s, m = results["settings"], results["machine"]
    engines = list(results["engines"])
    one = min(int(n) for n in results["unet_flops"])
    lines = [
        f"**{s['model']}**, {s['width']}x{s['height']} px, {s['steps']} {s['sampler']} steps, CFG {s['cfg']}, "
        f"seed {s['seed']}, {s['device']} {s['dtype']}, {s['threads']} threads. "
        f"Machine: {m.get('gpu') or m['cpu']}; matmul peak {m['gemm_peak_gflops']:.0f} GFLOP/s "
        f"({gemm_sources(m)}torch {m['torch']}). UNet: {fmt(results['unet_flops'][str(one)] / 1e9)} GFLOP per call at batch "
        f"{2 * one if s['cfg'] > 1 else one}.",
        "",
        "| figure | " + " | ".join(engines) + " |",
        "|---|" + "---:|" * len(engines),
    ]
    base = "diffusers" if "diffusers" in engines else None
    for label, unit, _, values in rows(results):
        cells = []
        for e in engines:
            if e not in values:
                cells.append("–")
                continue
            cell = f"{fmt(values[e])} {unit}"
            if base and e != base and values.get(base):
                cell += f" ({values[e] / values[base]:.2f}x)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    diffs = {e: r.get("max_pixel_diff_vs_diffusers") for e, r in results["engines"].items()}
    if any(d is not None for e, d in diffs.items() if e != base):
        lines.append("| max pixel difference to diffusers' image | "
                     + " | ".join("–" if diffs[e] is None else f"{diffs[e]}/255" for e in engines) + " |")
    lines += ["", "Ratios in brackets are to diffusers. " + " ".join(f"{n}." for n in results["notes"]).strip(),
              "", f"Command: `{results['command']}`" + (f" (commit {results['commit']})" if results.get("commit") else ""),
              ""]
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    """Diverging bars on a log scale: each engine's advantage over diffusers per figure (diffusers
    / engine for times and memory, engine / diffusers for throughput). Right of the centre line
    is better than diffusers, left is worse; bars stop at 16x."""
    import math

    from PIL import Image, ImageDraw, ImageFont

    engines = [e for e in results["engines"] if e != "diffusers"]
    data = []
    for label, _, lower, values in rows(results):
        if not values.get("diffusers"):
            continue
        ratios = {e: (values["diffusers"] / values[e] if lower else values[e] / values["diffusers"])
                  for e in engines if values.get(e)}
        data.append((label, ratios))
    font = ImageFont.load_default()
    bar, gap, left, half, top, limit = 12, 10, 230, 220, 50, 4.0  # limit: log2 of 16x
    height = top + max(len(data), 1) * (len(engines) * bar + gap) + 30
    image = Image.new("RGB", (left + 2 * half + 60, height), "white")
    draw = ImageDraw.Draw(image)
    s = results["settings"]
    draw.text((10, 8), f"{s['model']} {s['width']}px, {s['steps']} steps, {s['device']} {s['dtype']}: advantage over "
                       "diffusers, log scale (right of the line is better)", fill="black", font=font)
    centre = left + half
    x_of = lambda r: centre + int(half * max(-limit, min(limit, math.log2(r))) / limit)  # noqa: E731
    x = 10
    for e in engines:
        draw.rectangle((x, 28, x + 10, 38), fill=COLOURS.get(e, (200, 80, 0)))
        draw.text((x + 14, 27), e, fill="black", font=font)
        x += 30 + int(draw.textlength(e, font=font))
    for k in range(-int(limit), int(limit) + 1):
        x = centre + int(half * k / limit)
        draw.line((x, top - 6, x, height - 24), fill=(225, 225, 225))
        draw.text((x - 8, height - 20), f"{2 ** k:g}x", fill="gray", font=font)
    y = top
    for label, ratios in data:
        draw.text((10, y + 2), label[:36], fill="black", font=font)
        for i, e in enumerate(engines):
            if e in ratios:
                y0, x1 = y + i * bar, x_of(ratios[e])
                draw.rectangle((min(centre, x1), y0, max(centre, x1), y0 + bar - 2), fill=COLOURS.get(e, (200, 80, 0)))
                draw.text((max(centre, x1) + 4, y0), f"{ratios[e]:.2f}x", fill="black", font=font)
        y += len(engines) * bar + gap
    draw.line((centre, top - 6, centre, height - 24), fill="red", width=1)
    image.save(path)


def write_report(results: dict, folder: Path, name: str) -> dict[str, Path]:
    paths = {"json": folder / f"{name}.json", "md": folder / f"{name}.md", "png": folder / f"{name}.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["md"].write_text(markdown(results))
    chart(results, paths["png"])
    return paths
