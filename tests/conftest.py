"""Shared fixtures: tiny random reference models written once per test session."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests import reference_models directly

# The test models are tiny: threads cost more in synchronisation than they give, above all when
# the machine is busy.
torch.set_num_threads(1)

# (kind, prediction_type) of the tiny models the parity tests run on.
MODEL_KINDS = [("sd1", "epsilon"), ("sd2", "epsilon"), ("sd2", "v_prediction")]


@pytest.fixture(scope="session")
def reference_model(tmp_path_factory):
    """A function (kind, prediction_type) -> folder of a tiny diffusers-layout model, cached."""
    pytest.importorskip("diffusers")
    from reference_models import build_reference_model

    built = {}

    def get(kind: str = "sd1", prediction_type: str = "epsilon") -> Path:
        key = (kind, prediction_type)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"{kind}-{prediction_type}")
            built[key] = build_reference_model(folder, kind, prediction_type)
        return built[key]

    return get


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """A function kind ("sd1", "sd2", "sdxl") -> (diffusers folder, single-file .safetensors) of a
    tiny model that follows its family's rules (see reference_models.build_family_model), cached.
    The single file is written by sdlite's converter; the tests check it against diffusers'
    from_single_file, so the converter is not its own judge."""
    pytest.importorskip("diffusers")
    from reference_models import build_family_model

    from sdlite.single_file import save_single_file

    built = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in built:
            root = tmp_path_factory.mktemp(f"family-{kind}")
            folder = build_family_model(root / kind, kind)
            save_single_file(folder, root / f"{kind}.safetensors")
            built[kind] = (folder, root / f"{kind}.safetensors")
        return built[kind]

    return get
