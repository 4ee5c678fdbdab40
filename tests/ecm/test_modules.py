"""ECM LightningModules end to end on tiny shards: VQVAE → VAR → ECM, frozen bases, checkpoints, test metrics."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch

from ctrlgen.lightning_modules.cli import CtrlgenCLI

REPO = Path(__file__).resolve().parents[2]

TINY_VAR = ["--model.init_args.var_preset=tiny", "--model.init_args.var_overrides={embed_dim: 64, num_heads: 2, depth: 2}"]


def _common(shards, root, steps=2, test=False):
    args = [f"--data.init_args.train_shards={shards['train']}", f"--data.init_args.val_shards={shards['val']}",
            "--data.init_args.resolution=32", "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=4",
            "--data.init_args.num_workers=0", f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}",
            f"--data.init_args.train_batches_per_epoch={steps}", "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={root}", "-c", "configs/logger/csv.yaml"]
    return args + ([f"--data.init_args.test_shards={shards['test']}", "--trainer.limit_test_batches=1"] if test else [])


@pytest.fixture(scope="module")
def bases(shapes_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    vq = CtrlgenCLI(args=["fit", "-c", "configs/ecm/demo_vqvae.yaml", *_common(shapes_shards, root / "vq")])
    vq_ckpt = root / "vq" / "checkpoints" / "last.ckpt"
    assert vq_ckpt.exists() and vq.trainer.global_step == 2
    var = CtrlgenCLI(args=["fit", "-c", "configs/ecm/demo_var.yaml", *_common(shapes_shards, root / "var"), *TINY_VAR,
                           f"--model.init_args.vqvae_weights={vq_ckpt}"])
    var_ckpt = root / "var" / "checkpoints" / "last.ckpt"
    sd = torch.load(var_ckpt, weights_only=True)["state_dict"]
    assert not any(k.startswith("vqvae.") for k in sd) and any(k.startswith("var.") for k in sd)
    assert torch.equal(var.model.vqvae.quantize.embedding.weight, vq.model.vqvae.quantize.embedding.weight)
    return {"vq": vq_ckpt, "var": var_ckpt, "var_model": var.model}


def _ecm_args(shapes_shards, root, bases, steps=3, test=False, extra=()):
    return ["-c", "configs/ecm/demo_ecm.yaml", *_common(shapes_shards, root, steps, test), *TINY_VAR,
            f"--model.init_args.vqvae_weights={bases['vq']}", f"--model.init_args.var_weights={bases['var']}", *extra]


def test_ecm_trains_adapters_only_and_keeps_base_frozen(shapes_shards, tmp_path, bases):
    cli = CtrlgenCLI(args=["fit", *_ecm_args(shapes_shards, tmp_path, bases)])
    m = cli.model
    # frozen VAR: bitwise unchanged after training, eval mode, no grads, not in the optimizer
    for k, v in bases["var_model"].var.state_dict().items():
        assert torch.equal(v, m.var.state_dict()[k]), k
    assert not m.var.training and all(not p.requires_grad for p in m.var.parameters())
    opt_params = {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in m.control.parameters()}
    # gates moved away from zero (the adapters did learn something)
    assert m.control.gates.abs().sum() > 0
    sd = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(k.startswith(("control.", "f1_")) for k in sd), sorted(sd)[:5]
    logged = cli.trainer.logged_metrics
    assert "train/tokens" in logged and "train/trunc_scale" in logged and "train/gate0" in logged
    # validation scored controlled samples of the first val batch (val_control_batches: 1): recompute them
    from ctrlgen.lightning_modules.metrics.control import CannyF1

    batch = next(iter(cli.datamodule.val_dataloader()))
    m.eval()
    f1 = CannyF1(m.edge_extractor)
    f1.update(m.sample(batch, control=True), batch["cond"][:, 0] > 0)
    assert float(logged["val/canny_f1"]) == pytest.approx(float(f1.compute()), abs=1e-6)


def test_ecm_test_reports_canny_f1_and_resumes_from_small_checkpoint(shapes_shards, tmp_path, bases, capsys,
                                                                      monkeypatch):
    from ctrlgen.lightning_modules.metrics.control import MeanSEM

    CtrlgenCLI(args=["fit", *_ecm_args(shapes_shards, tmp_path / "fit", bases, steps=2)])
    ckpt = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    seen, update = [], MeanSEM.update

    def spy(self, values):  # records the per-image F1 differences the module feeds its margin metric
        seen.append((self, values.detach().double().flatten().cpu().clone()))
        return update(self, values)

    with monkeypatch.context() as mp:
        mp.setattr(MeanSEM, "update", spy)
        tested = CtrlgenCLI(args=["test", *_ecm_args(shapes_shards, tmp_path / "test", bases, test=True),
                                  f"--ckpt_path={ckpt}"])
    m = tested.trainer.callback_metrics
    assert 0.0 <= float(m["test/canny_f1"]) <= 1.0 and 0.0 <= float(m["test/canny_f1_base"]) <= 1.0
    # paired margin over the same test images: mean of per-image differences = difference of the means
    assert float(m["test/canny_f1_margin"]) == pytest.approx(float(m["test/canny_f1"]) - float(m["test/canny_f1_base"]),
                                                             abs=1e-5)
    # its SEM: sample std (ddof=1) / sqrt(n) of the per-image differences, checked against numpy
    diffs = torch.cat([v for obj, v in seen if obj is tested.model.f1_margin]).numpy()
    assert len(diffs) >= 2 and math.isfinite(float(m["test/canny_f1_margin_sem"]))
    assert float(m["test/canny_f1_margin"]) == pytest.approx(diffs.mean(), abs=1e-5)
    assert float(m["test/canny_f1_margin_sem"]) == pytest.approx(diffs.std(ddof=1) / math.sqrt(len(diffs)), abs=1e-6)
    # bench/cfg_control_f1.py re-samples the test set from the saved test config (its ckpt_path): its `both` and
    # base F1 are the module's, and cond_only is scored on the same images
    spec = importlib.util.spec_from_file_location("cfg_control_f1", REPO / "bench" / "cfg_control_f1.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    saved = sorted((tmp_path / "test").rglob("config.yaml"))  # the logger's directory holds it
    assert len(saved) == 1 and script.main(["--config", str(saved[0])]) == 0
    out = dict(re.findall(r"\[cfg_control_f1\] canny F1 (\w+) +([\d.]+)", capsys.readouterr().out))
    assert float(out["both"]) == pytest.approx(float(m["test/canny_f1"]), abs=1e-4)
    assert float(out["base"]) == pytest.approx(float(m["test/canny_f1_base"]), abs=1e-4)
    assert 0.0 <= float(out["cond_only"]) <= 1.0


def test_full_finetune_baseline_trains_the_var(shapes_shards, tmp_path, bases):
    cli = CtrlgenCLI(args=["fit", *_ecm_args(shapes_shards, tmp_path, bases, steps=2,
                                             extra=["--model.init_args.finetune_base=true"])])
    m = cli.model
    assert m.var.cond_drop_rate == 0.0 and m.control.cond_drop_rate == 0.1  # class dropout once, not twice
    changed = [k for k, v in bases["var_model"].var.state_dict().items() if not torch.equal(v, m.var.state_dict()[k])]
    assert changed, "full fine-tune left the VAR untouched"
    sd = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("var.") for k in sd) and not any(k.startswith("vqvae.") for k in sd)
    assert "train/trunc_scale" not in cli.trainer.logged_metrics or float(
        cli.trainer.logged_metrics["train/trunc_scale"]) == len(m.var.patch_nums) - 1


def test_missing_or_mismatched_base_weights_fail_clearly(shapes_shards, tmp_path, bases):
    # instantiation errors reach the user through the CLI's parse error, which quotes them
    with pytest.raises((FileNotFoundError, ValueError), match=r"weights file .*nope\.pth.* does not exist"):
        CtrlgenCLI(args=["fit", *_ecm_args(shapes_shards, tmp_path, bases,
                                           extra=[f"--model.init_args.var_weights={tmp_path / 'nope.pth'}"])])
    with pytest.raises(ValueError, match=r"last\.ckpt[\s\S]*(missing|unexpected|shape)"):  # a VAR of another width
        CtrlgenCLI(args=["fit", *_ecm_args(shapes_shards, tmp_path, bases,
                                           extra=["--model.init_args.var_overrides={embed_dim: 32, num_heads: 2, depth: 2}"])])


def test_test_writes_results_table_plots_and_wandb_table(shapes_shards, tmp_path, bases, monkeypatch):
    import json

    CtrlgenCLI(args=["fit", *_ecm_args(shapes_shards, tmp_path / "fit", bases, steps=2)])
    root = tmp_path / "test"
    monkeypatch.setenv("WANDB_MODE", "offline")
    CtrlgenCLI(args=["test", *_ecm_args(shapes_shards, root, bases, test=True), "-c", "configs/logger/wandb.yaml",
                     "--model.init_args.distribution_metrics=true",
                     "--model.init_args.fid_feature=tests.helpers.tiny_module.TinyFeatures",
                     f"--ckpt_path={tmp_path / 'fit' / 'checkpoints' / 'last.ckpt'}"])
    md = (root / "results.md").read_text()
    assert "canny_f1" in md and "canny_f1_base" in md and "definition" in md.lower()
    assert "| fid |" in md and "| precision |" in md and "3.55" in md  # FID row carries the VAR-d16 reference
    import wandb

    wandb.finish()  # close this test's offline run: a later WandbLogger in this process would otherwise reuse it
    tables = list((root / "wandb").glob("offline-run-*/files/media/table/test/results*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert "metric" in table["columns"] and any(r[0] == "canny_f1" for r in table["data"])
    csv = (root / "results.csv").read_text().splitlines()
    assert csv[0].startswith("metric") and any(line.startswith("canny_f1,") for line in csv)
    for png in ("plots/per_scale.png", "plots/test_condition_ecm_edges_base.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def _predict(shards, root, bases, extra=()):
    return CtrlgenCLI(args=["predict", *_ecm_args(shards, root, bases),
                            f"--data.init_args.predict_shards={shards['test']}", *extra])


def test_predict_writes_one_image_per_key_and_skips_finished(shapes_shards, tmp_path, bases):
    cli = _predict(shapes_shards, tmp_path, bases)
    out = tmp_path / "predictions"
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 16 and cli.trainer.callbacks  # the 16 test samples
    first = {p.name: p.read_bytes() for p in pngs}
    victim = pngs[3]
    victim.unlink()
    again = _predict(shapes_shards, tmp_path, bases)
    writer = next(c for c in again.trainer.callbacks if type(c).__name__ == "PredictionWriter")
    assert writer.written == 1 and writer.skipped == 15  # the batch holding the missing key was regenerated, one written
    assert victim.read_bytes() == first[victim.name]  # same seed → the same image


def test_fit_logs_the_histogram_of_s_to_wandb(shapes_shards, tmp_path, bases, monkeypatch):
    """Spec §2.5's histogram of s in a real offline W&B run: per epoch, ``train/trunc_scale_hist`` counts the epoch's
    per-step ``train/trunc_scale`` values, and ``train/trunc_frac_s{k}`` are those counts as fractions."""
    import collections

    import wandb

    from tests.utils.wandb_records import settled_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.finish()  # a run left open by an earlier test in this process would be reused by WandbLogger
    CtrlgenCLI(args=["fit", *_ecm_args(shapes_shards, tmp_path, bases, steps=6), "-c", "configs/logger/wandb.yaml",
                     "--data.init_args.train_batches_per_epoch=3", "--trainer.log_every_n_steps=1",
                     "--trainer.logger.init_args.id=hist-test", "--model.init_args.val_control_batches=0"])
    wandb.finish()
    run_file = next((tmp_path / "wandb").glob("offline-run-*-hist-test/run-*.wandb"))
    rows = settled_history(run_file, lambda rows: sum("train/trunc_scale" in r for r in rows) >= 6
                           and sum("train/trunc_scale_hist/values" in r for r in rows) >= 2)
    steps = [(r["trainer/global_step"], r["train/trunc_scale"]) for r in rows if "train/trunc_scale" in r]
    hists = [{k.rsplit("/", 1)[1]: v for k, v in r.items() if k.startswith("train/trunc_scale_hist/")} for r in rows
             if "train/trunc_scale_hist/values" in r]  # nested keys: .../_type, .../values, .../bins
    fracs = [{k: v for k, v in r.items() if k.startswith("train/trunc_frac_s")} for r in rows
             if any(k.startswith("train/trunc_frac_s") for k in r)]
    keys = {k for r in rows for k in r}
    assert len(steps) == 6 and len(hists) == 2 and len(fracs) == 2, (len(rows), sorted(keys))
    assert "val/loss" in keys and "val/canny_f1" not in keys  # val_control_batches: 0 = CE only in validation
    from ctrlgen.lightning_modules.ecm.scales import TINY_PATCH_NUMS

    perf = [r for r in rows if "perf/tokens_per_sec" in r and "train/trunc_scale" in r]
    assert perf and "perf/tokens_per_sec_all_ranks" in keys
    for r in perf:  # tokens per image of the step = the tokens of scales 0..s
        per_image = sum(p * p for p in TINY_PATCH_NUMS[: int(r["train/trunc_scale"]) + 1])
        assert r["perf/tokens_per_sec"] / r["perf/samples_per_sec"] == pytest.approx(per_image)
    for epoch, (hist, frac) in enumerate(zip(hists, fracs)):
        seen = collections.Counter(int(s) for _, s in sorted(steps)[3 * epoch: 3 * epoch + 3])
        assert hist["_type"] == "histogram" and sum(hist["values"]) == 3
        assert len(hist["bins"]) == len(hist["values"]) + 1
        assert {i: int(v) for i, v in enumerate(hist["values"]) if v} == dict(seen)
        assert sum(frac.values()) == pytest.approx(1.0)
        assert all(frac.get(f"train/trunc_frac_s{k}", 0.0) == pytest.approx(n / 3) for k, n in seen.items())


def test_histogram_of_s_survives_a_mid_epoch_resume(shapes_shards, tmp_path, bases):
    """A run stopped after 2 of an epoch's 4 batches and resumed from last.ckpt logs the same epoch histogram of s as
    the uninterrupted run: the steps before the checkpoint count too."""
    from ctrlgen.lightning_modules.ecm.sampling import draw_trunc_scale

    def fit(root, steps, extra=()):
        cli = CtrlgenCLI(args=["fit", *_ecm_args(shapes_shards, root, bases, steps=steps),
                               "--data.init_args.train_batches_per_epoch=4", "--model.init_args.val_control_batches=0",
                               *extra])
        return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("train/trunc_frac_s")}

    straight = fit(tmp_path / "a", 4)
    fit(tmp_path / "b", 2)
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    # configs/ecm/demo_ecm.yaml attaches the histogram callback, whose step counts travel in the checkpoint
    assert ckpt["callbacks"]["StepValueHistogram[kept_scale]"] == {"data_epoch": 0, "steps": {0: 1, 1: 1}}
    resumed = fit(tmp_path / "b", 4, ["--ckpt_path=last"])
    assert straight and resumed == pytest.approx(straight)
    # the check can fail: the resumed half alone (what the histogram counted before) has another distribution
    probs = {2: 0.2, 3: 0.6, 5: 0.2}  # configs/ecm/demo_ecm.yaml
    drawn = [draw_trunc_scale(probs, 1234, step) for step in range(4)]
    assert {f"train/trunc_frac_s{k}": drawn.count(k) / 4 for k in probs} == pytest.approx(straight)
    assert {f"train/trunc_frac_s{k}": drawn[2:].count(k) / 2 for k in probs} != pytest.approx(straight)


def test_every_ecm_recipe_attaches_the_histogram_callback_and_it_checks_the_module():
    import yaml

    from ctrlgen.callbacks import StepValueHistogram

    recipes = {p.name: yaml.safe_load(p.read_text()) for p in sorted((REPO / "configs" / "ecm").glob("*.yaml"))}
    ecm = {n: c for n, c in recipes.items() if c["model"]["class_path"].endswith(".ECMModule")}
    assert {"demo_ecm.yaml", "ecm_d16_canny.yaml", "ecm_d16_canny_fullft.yaml"} <= set(ecm)
    for name, cfg in ecm.items():
        cbs = [c for c in cfg["trainer"].get("callbacks+", []) if c["class_path"].endswith(".StepValueHistogram")]
        assert [c["init_args"]["value"] for c in cbs] == ["kept_scale"], name
    with pytest.raises(ValueError, match=r"needs one '\{\}'"):
        StepValueHistogram("kept_scale", "train/trunc_frac", "train/trunc_scale_hist")
    cb = StepValueHistogram("kept_scale", "train/trunc_frac_s{}", "train/trunc_scale_hist")
    with pytest.raises(ValueError, match="Linear has no kept_scale, kept_scale_bins, kept_scale_support"):
        cb.setup(None, torch.nn.Linear(1, 1), "fit")
