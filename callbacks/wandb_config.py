"""Save the resolved CLI config once per run directory (overwrite-safe for requeues) and send it to W&B.

Lightning's ``SaveConfigCallback`` raises if ``config.yaml`` exists (a requeued job writes into the same run dir,
lightning#17115) and never gives W&B the CLI config (lightning#19728): both fixed here (platform.md §1).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger


class WandbSaveConfig(SaveConfigCallback):
    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self.config.as_dict() if hasattr(self.config, "as_dict") else dict(self.config)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update({"cli": config, "stage": stage}, allow_val_change=True)
