"""The benchmark harness (benchmarks/): quick mode end to end, so it never rots, plus the pieces
that a CPU-only machine can check (device/dtype selection, full-size model shapes)."""

import importlib.util
import json
import math

import pytest
import torch

from benchmarks import compression, models, run


def test_reference_model_sizes_match_the_real_checkpoints():
    # Parameter counts (millions) of the real checkpoints: the random models have their shapes.
    expected = {
        "sd-2.1-base": {"unet": 865.9, "text_encoder": 340.4, "vae": 83.7},
        "sd-1.5": {"unet": 859.5, "text_encoder": 123.1, "vae": 83.7},
        "sdxl-base-1.0": {"unet": 2567.5, "text_encoder": 123.1, "text_encoder_2": 694.7, "vae": 83.7},
    }
    for name, components in expected.items():
        folder = models.CONFIGS / models.MODELS[name][0]
        counts = {}
        for component in components:
            config = json.loads((folder / component / "config.json").read_text())
            counts[component] = round(sum(math.prod(shape) for shape, _ in
                                          models.component_shapes(component, config).values()) / 1e6, 1)
        assert counts == components, name


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
    assert max(run.gemm_sizes(False, "cuda")) >= 8192 and max(run.gemm_sizes(False, "cpu")) <= 2048
    assert run.engine_skip_reason("openvino", "cuda", "float16") is not None
    assert run.engine_skip_reason("sdlite", "cuda", "float16") is None
    assert "SDXL" in (run.engine_skip_reason("openvino", "cpu", "float32", sdxl=True) or "")


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
                    "vae_decode_s", "end_to_end_s", "first_image_s", "peak_rss_mb"):
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


def test_runs_give_median_figures_and_the_largest_peak_rss():
    runs = [{"engine": "sdlite", "end_to_end_s": e2e, "unet_first_step_s": first, "peak_rss_mb": rss,
             "converted": True, "unet_images_per_s": {"1": ips}, "unet_steps": [first, 1.0]}
            for e2e, first, rss, ips in [(40.0, 9.0, 100, 0.5), (36.0, 4.0, 300, 0.7), (38.0, 6.0, 200, 0.6)]]
    combined = run.combine_runs(runs)
    assert combined["end_to_end_s"] == 38.0 and combined["unet_first_step_s"] == 6.0
    assert combined["peak_rss_mb"] == 300 and combined["unet_images_per_s"] == {"1": 0.6}
    assert combined["converted"] is True and combined["unet_steps"] == [6.0, 1.0]  # the last run's
    assert combined["runs"] == {"end_to_end_s": [40.0, 36.0, 38.0], "unet_first_step_s": [9.0, 4.0, 6.0]}
    assert run.combine_runs(runs[:1]) is runs[0]
    with pytest.raises(SystemExit):
        run.parse_args(["--runs", "0"])


def test_an_engine_that_fails_in_a_later_run_keeps_the_runs_it_finished(tmp_path, monkeypatch):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "config.json").write_text("{}")
    monkeypatch.setattr(run, "build_model", lambda *args: model)
    monkeypatch.setattr(run, "engine_skip_reason", lambda *args: None)
    calls = []

    def fake_process(spec, workdir, timeout):
        if spec["engine"] == "probe":
            return {"machine": {"cpu": "test", "gemm_peak_gflops": 100.0, "torch": "2"}, "unet_flops": {"1": 1e9}}
        calls.append(spec["engine"])
        if calls == ["sdlite", "diffusers", "sdlite"]:
            return {"engine": "sdlite", "error": "out of memory"}
        return {"engine": spec["engine"], "end_to_end_s": float(len(calls)), "unet_step_s": 1.0,
                "peak_rss_mb": 100.0 * len(calls), "unet_images_per_s": {"1": 1.0}}

    monkeypatch.setattr(run, "run_process", fake_process)
    results = run.main(["--quick", "--runs", "3", "--engines", "sdlite,diffusers", "--out", str(tmp_path),
                        "--name", "partial"])
    assert calls == ["sdlite", "diffusers", "sdlite", "diffusers", "diffusers"]
    assert results["engines"]["sdlite"]["end_to_end_s"] == 1.0  # its one finished run
    assert results["engines"]["diffusers"]["end_to_end_s"] == 4.0 and results["engines"]["diffusers"]["peak_rss_mb"] == 500
    notes = " ".join(results["notes"])
    assert "sdlite failed in run 2: out of memory" in notes and "sdlite 1.00 s (1 of 3 runs)" in notes
    assert "diffusers 2.00, 4.00, 5.00 s" in notes and "3 runs)" not in notes.split("diffusers 2.00")[1]
    assert results["commit"] is None or results["commit"].startswith(run.measured_commit()[:7])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_quick_benchmark_on_cuda(tmp_path):
    results = run.main(["--quick", "--device", "cuda", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path),
                        "--name", "quick-cuda", "--engines", "sdlite,sdlite-low-memory,diffusers,openvino"])
    assert results["settings"]["dtype"] == "float16" and results["machine"]["gpu"]
    assert sorted(results["engines"]) == ["diffusers", "sdlite", "sdlite-low-memory"], results["notes"]
    assert any(n.startswith("openvino skipped") for n in results["notes"])
    for name, r in results["engines"].items():
        assert r["peak_gpu_mb"] > 0 and r["unet_step_s"] > 0 and r["end_to_end_s"] > 0, name
        print(f"quick cuda {name}: {r['max_pixel_diff_vs_diffusers']}/255 from diffusers' image")
        assert r["max_pixel_diff_vs_diffusers"] <= 8, name  # fp16; tests/test_cuda.py checks parity closely


def test_quick_sdxl_benchmark_end_to_end(tmp_path):
    # SDXL's UNet takes added conditioning and its pipeline two text encoders (the low-memory engine
    # loads them per encoding); OpenVINO is skipped.
    pytest.importorskip("diffusers")
    results = run.main(["--quick", "--model", "tiny-xl", "--batches", "1,2", "--cache", str(tmp_path / "cache"),
                        "--out", str(tmp_path), "--name", "quick-xl",
                        "--engines", "sdlite,sdlite-low-memory,diffusers,openvino"])
    assert sorted(results["engines"]) == ["diffusers", "sdlite", "sdlite-low-memory"], results["notes"]
    assert any(n.startswith("openvino skipped") for n in results["notes"])
    for name, r in results["engines"].items():
        assert r["text_encoding_s"] > 0 and r["unet_step_s"] > 0, name
        assert r["max_pixel_diff_vs_diffusers"] <= 3, name
    assert results["unet_flops"]["2"] > results["unet_flops"]["1"] > 0
    for r in results["engines"].values():  # batch 2: a UNet call with SDXL's added conditioning
        assert r["unet_images_per_s"]["2"] > 0


def test_compression_rounds_give_the_median_step_and_the_largest_peak_rss():
    runs = [{"seconds_per_step": s, "peak_rss": rss, "load_s": 0.1, "evaluation": {"n": i}}
            for i, (s, rss) in enumerate([(6.0, 100), (5.0, 300), (9.0, 200)])]
    row = compression.combine_rounds(runs)
    assert row["seconds_per_step"] == 6.0 and row["peak_rss"] == 300
    assert row["evaluation"] == {"n": 0} and len(row["rounds"]) == 3
    rows = [dict(row, setting="fp32", bytes=1, psnr=None), dict(row, setting="6-bit jit", seconds_per_step=7.5,
                                                                 bytes=1, psnr=25.0)]
    assert "| 7.50 | 1.25x | 25.0 dB |" in compression.table(rows, with_eval=False)


def test_compression_results_follow_the_settings_order(tmp_path):
    """Rows kept from earlier runs come back in the settings' order, not the old file's; rows of
    settings no longer offered go last. PSNR is against the fp32 (low-memory) image."""
    from argparse import Namespace

    from PIL import Image

    rows = {}
    for shade, name in enumerate(["6-bit jit", "fp32", "old setting", "fp32 low-memory"]):
        image = tmp_path / f"{name}.png"
        Image.new("RGB", (4, 4), (shade, 0, 0)).save(image)
        rows[name] = {"setting": name, "image": str(image)}
    args = Namespace(model="bundled", steps=3, size=None)
    ordered = compression.write_results(tmp_path / "rows.json", args, rows, ["fp32", "fp32 low-memory", "6-bit jit"])
    assert [r["setting"] for r in ordered] == ["fp32", "fp32 low-memory", "6-bit jit", "old setting"]
    assert json.loads((tmp_path / "rows.json").read_text())["rows"] == ordered
    assert ordered[0]["psnr"] is None and math.isfinite(ordered[2]["psnr"])


def test_compression_cache_is_emptied_when_the_source_weights_change(tmp_path):
    source, cache = tmp_path / "model", tmp_path / "cache"
    (source / "unet").mkdir(parents=True)
    (source / "unet" / "w.safetensors").write_bytes(b"0" * 10)
    cache.mkdir()
    (cache / "unknown-origin").write_text("")  # a cache without a record of its source
    assert not (compression.fresh_cache(cache, source) / "unknown-origin").exists()
    (cache / "6-bit").write_text("")
    assert (compression.fresh_cache(cache, source) / "6-bit").exists()  # same weights: kept
    (source / "unet" / "w.safetensors").write_bytes(b"1" * 11)  # retrained
    assert not (compression.fresh_cache(cache, source) / "6-bit").exists()
