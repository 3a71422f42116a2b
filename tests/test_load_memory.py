"""Peak memory while loading: at most 1.2x the size of the loaded weights.

Measured in a fresh subprocess as the growth of the resident-set high-water mark (VmHWM) over the
resident set just before loading, for a 66M-parameter CLIP text encoder (264 MB in fp32). Weights
stored in the model's dtype are memory-mapped, so loading them costs next to nothing until used;
cast weights are read in chunks straight into their final dtype (about 1.0-1.1x measured).
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from sdlite.clip import CLIPTextModel
from sdlite.config import CLIPConfig

CONFIG = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=4)

MEASURE = """
import json, sys, torch
from pathlib import Path
from sdlite.clip import CLIPTextModel
from sdlite.config import CLIPConfig
from sdlite.loading import load_component

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

folder, dtype = Path(sys.argv[1]), getattr(torch, sys.argv[2])
config = CLIPConfig.from_json(json.loads((folder / "config.json").read_text()))
before = status("VmRSS")
model = load_component(CLIPTextModel, config, folder, dtype)
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps(dict(growth=status("VmHWM") - before, weights=weights)))
"""


def write_random_clip(folder, dtype):
    config = CLIPConfig(**CONFIG)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIPTextModel(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=generator).to(dtype) for k, s in shapes.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(CONFIG))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("file_dtype, model_dtype", [("float32", "float32"), ("float16", "float32"), ("float32", "float16")])
def test_peak_memory_while_loading_stays_near_the_weights_size(tmp_path, file_dtype, model_dtype):
    write_random_clip(tmp_path, getattr(torch, file_dtype))
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path), model_dtype], capture_output=True, text=True, check=True
    )
    measured = json.loads(result.stdout)
    assert measured["weights"] > 120e6
    assert measured["growth"] <= 1.2 * measured["weights"], measured
