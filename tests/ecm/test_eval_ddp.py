"""Distributed evaluation: 2 CPU ranks generate disjoint, complete sample sets equal to the 1-rank run."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import REPO, cli_env, ctrlgen_cmd

pytestmark = pytest.mark.slow


def _predict(shards, root, ranks: int):
    args = ["predict", "-c", "configs/ecm/demo_ecm.yaml", "-c", "configs/logger/csv.yaml",
            "--model.init_args.var_weights=null", "--model.init_args.vqvae_weights=null",
            "--model.init_args.var_preset=tiny", "--model.init_args.var_overrides={embed_dim: 64, num_heads: 2, depth: 2}",
            f"--data.init_args.predict_shards={shards['test']}", "--data.init_args.eval_batch_size=4",
            "--data.init_args.num_workers=1", f"--trainer.default_root_dir={root}"]
    if ranks == 2:
        args += ["-c", "configs/trainer/ddp_cpu.yaml"]
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"  # same intra-op threads per process in both runs: bitwise-equal float reductions
    r = subprocess.run(ctrlgen_cmd() + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return {p.name: p.read_bytes() for p in (root / "predictions").glob("*.png")}


def test_two_ranks_equal_one_rank(shapes_shards, tmp_path):
    one = _predict(shapes_shards, tmp_path / "one", 1)
    two = _predict(shapes_shards, tmp_path / "two", 2)
    assert len(one) == 16 and one.keys() == two.keys()
    assert all(one[k] == two[k] for k in one)  # same images for the same keys
    grids = sorted(p.name for p in (tmp_path / "two" / "predictions" / "grids").glob("*.png"))
    assert any(g.startswith("rank0") for g in grids) and any(g.startswith("rank1") for g in grids)  # both ranks worked
