"""`ctrlgen demo ecm` as `make demo` runs it (subprocess, offline W&B), shortened to 4 steps per stage.

What is checked is the pipeline, not quality (4 steps train nothing; the quality run is in docs/results.md): every stage
leaves its checkpoint, sample grid and its own offline W&B run; the full-fine-tune branch ran in its own process; the
summary holds canny F1 for controlled and uncontrolled samples of both branches, step times, the stage timings and the
demo contract's claims (canny_f1_margin, epoch_cost_ratio).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env

pytestmark = pytest.mark.slow


def test_demo_pipeline_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**cli_env(), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_SERVICE", None)
    r = subprocess.run([sys.executable, "-m", "ctrlgen.lightning_modules.cli", "demo", "ecm", "--fast", "--out", str(out),
                        "--steps", "vqvae=40,var=40,ecm=40,fullft=40"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == {"vqvae": 40, "var": 40, "ecm": 40, "fullft": 40} and s["fast"] is True
    assert s["parallel_branches"] is True and (out / "fullft.log").stat().st_size > 0
    for name in ("ecm", "fullft"):
        m = s["results"][name]
        assert m["train_steps"] == 4, m  # --fast: a tenth of --steps
        for k in ("test/canny_f1", "test/canny_f1_base"):
            assert 0.0 <= m[k] <= 1.0, (name, k, m[k])
        assert m["train_s_per_step"] > 0
    # full fine-tune trains the VAR as well: more trainable parameters than the adapters alone
    assert s["results"]["fullft"]["trainable_params"] > s["results"]["ecm"]["trainable_params"] > 0
    assert math.isclose(s["margin_f1_ecm_vs_base"],
                        s["results"]["ecm"]["test/canny_f1"] - s["results"]["ecm"]["test/canny_f1_base"])
    assert set(s["timings_s"]) >= {"shards", "vqvae", "var", "ecm", "fullft", "test_ecm", "test_fullft"}
    for stage in ("vqvae", "var", "ecm", "fullft"):
        assert (out / stage / "checkpoints" / "last.ckpt").exists(), stage
        assert list((out / stage).rglob("*.png")), f"no sample grid under {out / stage}"
    runs = {stage: sorted((out / stage).glob("wandb/offline-run-*")) for stage in
            ("vqvae", "var", "ecm", "fullft", "ecm-test", "fullft-test")}
    assert all(len(v) == 1 for v in runs.values()), runs  # one W&B run per stage, none shared
    assert len({v[0].name for v in runs.values()}) == len(runs)
    table = (out / "results.md").read_text()
    assert "| ECM (frozen VAR + adapters) |" in table and "| full fine-tune baseline |" in table and "margin" in table
    assert "F1 margin ECM vs uncontrolled base" in r.stdout
    # the demo contract: claims with their names, targets and values from the results above
    claims = {c["name"]: c for c in s["claims"]}
    assert s["method"] == "ecm" and list(claims) == ["canny_f1_margin", "epoch_cost_ratio"]
    assert all(set(c) == {"name", "value", "target", "met"} for c in claims.values())
    assert claims["canny_f1_margin"]["target"] == "> 0.05" and claims["epoch_cost_ratio"]["target"] == "< 1"
    assert math.isclose(claims["canny_f1_margin"]["value"], s["margin_f1_ecm_vs_base"])
    assert math.isclose(claims["epoch_cost_ratio"]["value"], s["ratio_train_s_per_step_ecm_vs_fullft"])
    assert claims["epoch_cost_ratio"]["met"] == (claims["epoch_cost_ratio"]["value"] < 1)
    assert "canny_f1_margin" in r.stdout and "epoch_cost_ratio" in r.stdout  # the claims table is printed
    assert "canny_f1_margin" in table
