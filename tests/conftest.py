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
