#!/usr/bin/env bash
# GPU check of configs/strategy/fsdp.yaml and fsdp_hybrid.yaml (Lightning 2.6.6 refuses FSDP on CPU, so the CPU test
# tier only checks that the configs instantiate: tests/slurm/test_strategy_configs.py).
#
#   bash bench/gpu_fsdp_check.sh [OUT_DIR]          # on a GPU node, all its GPUs; PYTHON=... to pick the interpreter
#   srun --gres=gpu:2 --ntasks=1 bash bench/gpu_fsdp_check.sh runs/fsdp-check
#
# For each config x state_dict_type (full, sharded) it trains the tiny VAR (ctrlgen.lightning_modules.ecm.var, preset "tiny")
# under the config's strategy and precision (bf16-mixed), and checks:
#   - every AdaLNSelfAttn block is its own FSDP unit and is activation-checkpointed (the class paths in the YAML resolve);
#   - loss is finite; trainer.save_checkpoint(default_root_dir/hpc_ckpt_1.ckpt) — what the SIGUSR1 handler calls —
#     writes a complete checkpoint (a zip file for "full", a directory with metadata for "sharded");
#   - Lightning's SLURM resume path (the highest hpc_ckpt_N in default_root_dir) picks it, a second Trainer resumes from
#     it to exactly max_steps, saves hpc_ckpt_2, and callbacks/hpc_prune.py keeps only hpc_ckpt_2.
# Needs torch with CUDA, lightning 2.6.6 and PyYAML; not jsonargparse (the YAML is read directly, the way the CLI would
# build the strategy). Prints one JSON line per case and exits 1 if any case fails. ~40 s on one H200.
# If the config fails on VAR with "mat1 and mat2 must have the same dtype" (VAR.embed_inputs runs word_embed in fp32
# with autocast off; FSDP bf16-mixed gathers bf16 params), the case is rerun with word_embed fed in its weight dtype
# and reported with ok=false, ok_with_var_fix=<mechanics result>.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then PY=$REPO/.venv/bin/python
else PY=python3; fi
DEST=${1:-$(mktemp -d /tmp/ctrlgen-fsdp-check.XXXXXX)}
mkdir -p "$DEST"
SCRIPT=$DEST/gpu_fsdp_check.py
cat >"$SCRIPT" <<'PYEOF'
import importlib
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

REPO, DEST = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(REPO))
import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: E402

from ctrlgen.lightning_modules.ecm.var import AdaLNSelfAttn, build_var  # noqa: E402

spec = importlib.util.spec_from_file_location("hpc_prune", REPO / "callbacks" / "hpc_prune.py")
hpc_prune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hpc_prune)  # by path: callbacks/__init__ pulls in the CLI stack (jsonargparse)


def resolve(path: str):
    mod, _, name = path.rpartition(".")
    return getattr(importlib.import_module(mod), name)


def strategy_from_yaml(cfg_path: Path, state_dict_type: str):
    trainer_cfg = yaml.safe_load(cfg_path.read_text())["trainer"]
    init = dict(trainer_cfg["strategy"]["init_args"])
    for k in ("auto_wrap_policy", "activation_checkpointing_policy"):
        if k in init:
            init[k] = {resolve(c) for c in init[k]}
    if "timeout" in init:
        h, m, s = (int(x) for x in str(init["timeout"]).split(":"))
        init["timeout"] = timedelta(hours=h, minutes=m, seconds=s)
    init["state_dict_type"] = state_dict_type
    return resolve(trainer_cfg["strategy"]["class_path"])(**init), trainer_cfg.get("precision", "32-true")


def cast_to_weight(linear):
    """The fix proposed for VAR.embed_inputs: feed word_embed in its weight's dtype (bf16 under FSDP bf16-mixed)."""
    linear.forward = lambda x: F.linear(x.to(linear.weight.dtype), linear.weight, linear.bias)


class TinyVAR(L.LightningModule):
    def __init__(self, patch_embed=False):
        super().__init__()
        self.var = build_var("tiny")
        if patch_embed:
            cast_to_weight(self.var.word_embed)

    def training_step(self, batch, batch_idx):
        label, x, target = batch
        logits = self.var(label, x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))
        self.log("loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def loader(n_batches=64, batch=8):
    v = build_var("tiny")
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, v.num_classes, (n_batches * batch,), generator=g)
    x = torch.randn(n_batches * batch, v.L - v.first_l, v.Cvae, generator=g)
    target = torch.randint(0, v.V, (n_batches * batch, v.L), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(label, x, target), batch_size=batch)


class LastLoss(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def trainer(root, strategy, precision, steps, cbs=()):
    return L.Trainer(accelerator="gpu", devices=torch.cuda.device_count(), strategy=strategy, precision=precision,
                     max_steps=steps, default_root_dir=str(root), logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(cbs))


def case(cfg_name: str, sdt: str, patch_embed: bool = False) -> dict:
    t0 = time.time()
    root = DEST / f"{cfg_name}-{sdt}"
    cfg = REPO / "configs" / "strategy" / f"{cfg_name}.yaml"
    rec = LastLoss()
    strat, precision = strategy_from_yaml(cfg, sdt)
    t1 = trainer(root, strat, precision, 5, [rec])
    model = TinyVAR(patch_embed)
    t1.fit(model, loader())
    mods = list(t1.strategy.model.modules())
    n_blocks = sum(isinstance(m, AdaLNSelfAttn) for m in mods)
    fsdp_blocks = sum(isinstance(m, FullyShardedDataParallel) and isinstance(getattr(m, "module", None), (AdaLNSelfAttn, CheckpointWrapper)) for m in mods)
    ckpt_blocks = sum(isinstance(m, CheckpointWrapper) for m in mods)
    p1 = root / "hpc_ckpt_1.ckpt"
    t1.save_checkpoint(p1)  # what Lightning's SIGUSR1 handler does
    rank0 = t1.is_global_zero
    out = {"config": cfg_name, "state_dict_type": sdt, "var_embed_patched": patch_embed, "gpus": torch.cuda.device_count(), "precision": precision,
           "sharding": str(t1.strategy.sharding_strategy), "blocks": n_blocks, "fsdp_wrapped_blocks": fsdp_blocks,
           "checkpointed_blocks": ckpt_blocks, "loss_first_last": [rec.losses[0], rec.losses[-1]],
           "hpc_ckpt_1_is_dir": p1.is_dir(), "hpc_ckpt_1_complete": hpc_prune.is_complete(p1),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    rec2 = LastLoss()
    strat2, _ = strategy_from_yaml(cfg, sdt)
    t2 = trainer(root, strat2, precision, 10, [rec2, hpc_prune.HPCCheckpointPrune()])
    picked = t2._checkpoint_connector._hpc_resume_path  # Lightning's SLURM choice: highest hpc_ckpt_N in root
    out["slurm_resume_picks"] = Path(picked).name if picked else None
    t2.fit(TinyVAR(patch_embed), loader(), ckpt_path=picked)
    out["resumed_steps"] = len(rec2.losses)
    out["global_step_after_resume"] = t2.global_step
    t2.save_checkpoint(root / "hpc_ckpt_2.ckpt")
    if rank0:
        hpc_prune.prune_hpc_checkpoints(root)
    t2.strategy.barrier()
    out["after_prune"] = sorted(p.name for p in root.glob("hpc_ckpt_*"))
    out["seconds"] = round(time.time() - t0, 1)
    ok = (n_blocks > 0 and fsdp_blocks == n_blocks and ckpt_blocks == n_blocks and out["hpc_ckpt_1_complete"]
          and out["hpc_ckpt_1_is_dir"] == (sdt == "sharded") and out["slurm_resume_picks"] == "hpc_ckpt_1.ckpt"
          and out["resumed_steps"] == 5 and out["global_step_after_resume"] == 10
          and all(math.isfinite(x) for x in rec.losses + rec2.losses) and out["after_prune"] == ["hpc_ckpt_2.ckpt"])
    out["ok"] = bool(ok)
    return out


def run_case(cfg_name, sdt, patch_embed=False):
    try:
        return case(cfg_name, sdt, patch_embed)
    except Exception as e:  # noqa: BLE001 - report every case
        return {"config": cfg_name, "state_dict_type": sdt, "var_embed_patched": patch_embed, "ok": False,
                "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-1500:]}


def main():
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    results = []
    for cfg_name in ("fsdp", "fsdp_hybrid"):
        for sdt in ("full", "sharded"):
            r = run_case(cfg_name, sdt)
            if not r["ok"] and "must have the same dtype" in r.get("error", ""):
                # VAR.embed_inputs runs word_embed in fp32 with autocast off, but Lightning 2.6.6's FSDP bf16-mixed
                # all-gathers parameters in bf16 (MixedPrecision param_dtype=bf16): check the strategy mechanics
                # with the proposed one-line VAR fix applied, and report that the fix is needed
                r2 = run_case(cfg_name, sdt, patch_embed=True)
                r2["unpatched_error"] = r["error"]
                r2["ok_with_var_fix"] = r2["ok"]
                r2["ok"] = False  # the config does not train VAR as-is
                r = r2
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                print("fsdp-check " + json.dumps(r), flush=True)
            results.append(r)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        (DEST / "fsdp_check.json").write_text(json.dumps(results, indent=1))
    sys.exit(0 if all(r["ok"] for r in results) else 1)


main()
PYEOF
cd "$REPO"
exec "$PY" "$SCRIPT" "$REPO" "$DEST"
