"""The benchmark harness (benchmarks/): quick mode end to end, so it never rots, plus the pieces
that a CPU-only machine can check (device/dtype selection, full-size model shapes)."""

import importlib.util
import json

import pytest

from benchmarks import models, run


def test_reference_model_sizes_match_the_real_checkpoints():
    # Parameter counts of the real checkpoints (shared/README): the random models have their shapes.
    expected = {"sd-2.1-base": (865.9, 340.4, 83.7), "sd-1.5": (859.5, 123.1, 83.7)}
    for name, (unet, text, vae) in expected.items():
        folder = models.CONFIGS / models.MODELS[name][0]
        counts = []
        for component in ("unet", "text_encoder", "vae"):
            config = json.loads((folder / component / "config.json").read_text())
            shapes = models.component_shapes(component, config)
            n = 0
            for shape, _ in shapes.values():
                size = 1
                for d in shape:
                    size *= d
                n += size
            counts.append(round(n / 1e6, 1))
        assert counts == [unet, text, vae], name


def test_device_and_dtype_selection():
    assert run.resolve_device("auto", "auto", cuda_available=False) == ("cpu", "float32")
    assert run.resolve_device("auto", "auto", cuda_available=True) == ("cuda", "float16")
    assert run.resolve_device("cuda", "float32", cuda_available=True) == ("cuda", "float32")
    assert run.resolve_device("cpu", "bfloat16", cuda_available=True) == ("cpu", "bfloat16")
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        run.resolve_device("cuda", "float16", cuda_available=False)
    with pytest.raises(SystemExit, match="--dtype"):
        run.resolve_device("cpu", "float64", cuda_available=False)
    with pytest.raises(SystemExit, match="--device"):
        run.resolve_device("tpu", "auto", cuda_available=False)
    assert run.engine_skip_reason("openvino", "cuda", "float16") is not None
    assert run.engine_skip_reason("sdlite", "cuda", "float16") is None


def test_quick_benchmark_end_to_end(tmp_path):
    pytest.importorskip("diffusers")
    results = run.main(["--quick", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path), "--name", "quick"])
    engines = results["engines"]
    expected = ["sdlite", "diffusers"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    assert sorted(engines) == sorted(expected), results["notes"]
    if "openvino" not in engines:
        assert any(n.startswith("openvino skipped") for n in results["notes"])
    for name, r in engines.items():
        for key in ("import_s", "load_s", "cold_start_s", "text_encoding_s", "unet_first_step_s", "unet_step_s",
                    "vae_decode_s", "end_to_end_s", "peak_rss_mb"):
            assert r[key] > 0, (name, key)
        assert set(r["unet_images_per_s"]) == {"1", "2"}
        assert len(r["unet_steps"]) >= 3
        # Same seed, same weights, same sampler: the engines draw the same image.
        assert r["max_pixel_diff_vs_diffusers"] <= 3, name
    assert results["unet_flops"]["2"] > results["unet_flops"]["1"] > 0
    assert results["machine"]["gemm_peak_gflops"] > 0
    table = (tmp_path / "quick.md").read_text()
    assert "| UNet step (median) |" in table and "x) |" in table  # ratios to diffusers
    assert (tmp_path / "quick.png").stat().st_size > 1000
    assert json.loads((tmp_path / "quick.json").read_text())["settings"]["model"] == "tiny"
