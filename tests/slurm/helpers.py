"""Test-only callback for SLURM jobs (``--trainer.callbacks+=tests.slurm.helpers.SlurmProbe``), configured by env vars
because the job passes it through ``sbatch``: ``CTRLGEN_PROBE_DIR`` (where to write) and ``CTRLGEN_PROBE_SLEEP``
(seconds per training step, so a test can signal a job mid-run). Writes, per attempt (``SLURM_RESTART_COUNT``):
``probe-r<rank>-a<attempt>.json`` (cluster environment, strategy, backend, world size) and, on rank 0,
``steps.txt`` lines ``<attempt> <global_step>`` after every optimizer step.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L
import torch.distributed as dist


class SlurmProbe(L.Callback):
    def __init__(self) -> None:
        self.dir = Path(os.environ.get("CTRLGEN_PROBE_DIR", "."))
        self.sleep = float(os.environ.get("CTRLGEN_PROBE_SLEEP", "0"))
        self.attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        env = trainer.strategy.cluster_environment
        info = {
            "rank": trainer.global_rank, "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
            "cluster_environment": type(env).__name__ if env is not None else None,
            "strategy": type(trainer.strategy).__name__,
            "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
            "attempt": self.attempt, "job_id": os.environ.get("SLURM_JOB_ID"),
            "procid": os.environ.get("SLURM_PROCID"), "step_id": os.environ.get("SLURM_STEP_ID"),
            "master_port": os.environ.get("MASTER_PORT"), "stage": stage,
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"probe-r{trainer.global_rank}-a{self.attempt}.json").write_text(json.dumps(info))
        print(f"ctrlgen-probe {json.dumps(info, sort_keys=True)}", flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.is_global_zero:
            with open(self.dir / "steps.txt", "a") as f:
                f.write(f"{self.attempt} {trainer.global_step}\n")
                f.flush()
                os.fsync(f.fileno())
        if self.sleep:
            time.sleep(self.sleep)
