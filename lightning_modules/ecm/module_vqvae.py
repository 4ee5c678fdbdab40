"""``VQVAEModule``: trains VAR's multi-scale tokenizer (reconstruction + commitment), logging codebook usage per scale.

The first of ECM's base stages (ecm.md §3.2): users without the official ``vae_ch160v4096z32.pth`` train their own.
"""

from __future__ import annotations

from typing import Any

import torch

from ctrlgen.lightning_modules.common.base import BaseGenModule, decay_groups
from ctrlgen.lightning_modules.ecm.bases import make_vqvae
from ctrlgen.lightning_modules.ecm.losses import recon_loss


class VQVAEModule(BaseGenModule):
    def __init__(self, preset: str = "vae_ch160v4096z32", vqvae_overrides: dict | None = None,
                 weights: str | None = None, l1_weight: float = 1.0, l2_weight: float = 1.0, vq_weight: float = 1.0,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.vqvae, self.weights_info = make_vqvae(preset, vqvae_overrides, weights)
        self.l1_weight, self.l2_weight, self.vq_weight = l1_weight, l2_weight, vq_weight

    def param_groups(self) -> list[dict]:
        return decay_groups(self.named_parameters(), ("embedding",))

    def model_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        img = batch["image"]
        if img.shape[-1] != self.vqvae.image_size:
            raise ValueError(f"images are {img.shape[-1]} px but this VQVAE expects {self.vqvae.image_size} px "
                             "(set data.init_args.resolution)")
        rec, vq_loss, usages = self.vqvae(img, ret_usages=stage != "train" or self.global_step % 10 == 0)
        rec_l = recon_loss(rec, img, self.l1_weight, self.l2_weight)
        out = {"loss": rec_l + self.vq_weight * vq_loss, "recon": rec_l.detach(), "vq": vq_loss.detach(),
               "psnr": (10 * torch.log10(4.0 / (rec.detach() - img).pow(2).mean().clamp_min(1e-10)))}
        if usages is not None:
            out["codebook_usage_last_scale"] = float(usages[-1])  # numbers: synced on any device
            out["codebook_usage_mean"] = float(sum(usages) / len(usages))
        return out

    @torch.no_grad()
    def sample_images(self, batch: dict[str, Any], n: int) -> dict[str, torch.Tensor]:
        img = batch["image"][:n]
        rec = self.vqvae.idx_to_img(self.vqvae.img_to_idx(img))
        return {"input_vs_reconstruction": torch.cat([img, rec]).add(1).div(2)}
