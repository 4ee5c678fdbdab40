"""The defocus benchmarks run: the CPU bench at a tiny size, the GPU script's CUDA guard. Timings are the benchmarks'
business (docs/benchmarks.md), not a test's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    res = _load("bench_defocus_render").main(["--size", "32", "--repeats", "1", "--json", str(out)])
    assert out.exists() and res["size"] == 32 and res["levels"] == 5
    assert set(res["median_ms"]) == {"layered_fwd", "layered_fwd_bwd", "gather_fwd", "gather_fwd_bwd"}
    assert all(v > 0 for v in res["median_ms"].values())
    assert res["psnr_layered_vs_gather_db"] > 30.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_gpu_bench_exits_with_a_message_without_cuda():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        _load("gpu_defocus").main(["--repeats", "1"])
