"""``VARModule``: class-conditional next-scale prediction on top of a frozen VQVAE (ecm.md §3.4, §3.6).

The second base stage. The VQVAE comes from its own file (official ``.pth`` or a ``VQVAEModule`` checkpoint) and stays
out of this module's checkpoints. Data are images (tokenised on the fly) or pre-tokenised ``codes`` (``vq.npy``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from ctrlgen.lightning_modules.common.base import BaseGenModule, decay_groups
from ctrlgen.lightning_modules.common.frozen import describe, freeze
from ctrlgen.lightning_modules.ecm.bases import check_compatible, make_var, make_vqvae
from ctrlgen.lightning_modules.ecm.losses import token_ce
from ctrlgen.lightning_modules.ecm.var import SAMPLERS, VAR
from ctrlgen.lightning_modules.ecm.vqvae import VQVAE


def split_codes(codes_BL: torch.Tensor, begin_ends: list[tuple[int, int]], upto: int | None = None) -> list[torch.Tensor]:
    """Flat codes (B, L) in VAR order → per-scale (B, pn²) tensors for scales 0..upto."""
    n = len(begin_ends) if upto is None else upto + 1
    return [codes_BL[:, bg:ed] for bg, ed in begin_ends[:n]]


# VAR's train.py: no weight decay on 1-D params and names containing these (class_emb and word_embed do decay)
VAR_NO_DECAY = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")


class VARBase(BaseGenModule):
    """Shared by ``VARModule`` and ``ECMModule``: frozen VQVAE, tokens of a batch, per-scale logging, sampling args.
    ``no_decay_keys``: the VAR's parameter-name substrings kept out of weight decay (VAR's own list by default), for
    every module that trains the VAR."""

    no_decay_keys: tuple[str, ...] = VAR_NO_DECAY

    def __init__(self, var_preset: str, var_overrides: dict | None, var_weights: str | None, vqvae_preset: str,
                 vqvae_overrides: dict | None, vqvae_weights: str | None, loss_norm: str = "kept_mean",
                 label_smoothing: float = 0.0, cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96,
                 grad_checkpointing: bool = False, sampler: str = "eager", base_mismatch: str = "error",
                 var_net: VAR | None = None, vqvae_net: VQVAE | None = None, **kwargs: Any):
        """``grad_checkpointing``: recompute each VAR block (and ECM adapter) in the backward instead of keeping its
        activations — for GPUs whose memory does not hold the batch (≈ 1/3 more compute per step).
        ``sampler``: ``eager`` | ``static`` | ``graph`` (CUDA only) for every sample this module draws (validation
        grids, test, predict); all three give the same tokens from the same generator (ecm/fastpath.py).
        ``base_mismatch``: ``error`` | ``warn`` when a checkpoint was made on other frozen base files (sha256) than
        the ones this run loads (``on_load_checkpoint``).
        ``var_net`` / ``vqvae_net``: the networks themselves, injected from the config (``class_path:
        ctrlgen.lightning_modules.ecm.VAR`` with its ``init_args``) instead of ``*_preset`` + ``*_overrides``; the
        ``*_weights`` files are loaded into them all the same."""
        if sampler not in SAMPLERS:
            raise ValueError(f"model.init_args.sampler must be one of {'|'.join(SAMPLERS)}, got {sampler!r}")
        super().__init__(base_mismatch=base_mismatch, **kwargs)
        self.vqvae, self.vqvae_info = make_vqvae(vqvae_preset, vqvae_overrides, vqvae_weights, vqvae_net)
        self.var, self.var_info = make_var(var_preset, var_overrides, var_weights, var_net)
        check_compatible(self.vqvae, self.var)
        self.var.grad_checkpointing = grad_checkpointing
        freeze(self.vqvae, source=self.vqvae_info, config_key="model.init_args.vqvae_weights")
        self.loss_norm, self.label_smoothing = loss_norm, label_smoothing
        self.sample_kwargs = {"cfg": cfg, "top_k": top_k, "top_p": top_p, "sampler": sampler}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:
            self.check_datamodule(dm)
        dev = self.trainer.strategy.root_device
        if self.sample_kwargs["sampler"] == "graph" and dev.type != "cuda":
            raise ValueError(f"model.init_args.sampler 'graph' captures CUDA graphs and needs a CUDA device; this run "
                             f"is on {dev} (use 'static': the same tokens without graphs)")

    def check_datamodule(self, dm: Any) -> None:
        """Run at ``setup`` against the trainer's datamodule (before training): the data must fit this module."""
        self.check_pretokenized(dm)
        self.check_num_classes(dm)

    def check_num_classes(self, dm: Any) -> None:
        """A datamodule that range-checks labels (``num_classes``) learns the VAR's class count, or must agree."""
        if not hasattr(dm, "num_classes"):
            return
        if dm.num_classes is None:
            dm.num_classes = self.var.num_classes
        elif int(dm.num_classes) != self.var.num_classes:
            raise ValueError(f"data.init_args.num_classes {dm.num_classes} differs from the VAR's num_classes "
                             f"{self.var.num_classes} (model.init_args.var_preset/var_overrides): set them equal, or "
                             "leave data.init_args.num_classes unset to take the model's")

    def check_pretokenized(self, dm: Any) -> None:
        """Pre-tokenised shards must hold this run's VQVAE's codes: ``tokenize.json`` beside them records the sha256
        of the weights that made them (``ctrlgen data tokenize``). A mismatch fails (or warns, ``base_mismatch``)."""
        if not getattr(dm, "pretokenized", False):
            return
        from ctrlgen.datamodules.shards import expand_urls, is_remote

        live = (self.vqvae_info or {}).get("sha256")
        for split, spec in getattr(dm, "shards", {}).items():
            urls = expand_urls(spec) if spec else []
            dirs = {Path(u.removeprefix("file:")).parent for u in urls if not is_remote(u)}
            for meta in sorted(d / "tokenize.json" for d in dirs):
                if not meta.is_file():
                    rank_zero_warn(f"data.init_args.{split}_shards: no {meta} to check which VQVAE made the codes")
                    continue
                rec = json.loads(meta.read_text())
                sha = rec.get("weights_sha256")
                if sha is not None and sha == live:
                    continue
                made_by = describe({"path": rec.get("weights"), "sha256": sha} if sha else None)
                self.base_mismatch_found(
                    f"data.init_args.{split}_shards: {meta} records codes of the VQVAE {made_by}, but this run's VQVAE "
                    f"is {describe(self.vqvae_info)}: tokenise again with it, or set "
                    "model.init_args.base_mismatch=warn")

    def tokens(self, batch: dict[str, Any], last_si: int | None = None) -> list[torch.Tensor]:
        if "codes" in batch:
            return split_codes(batch["codes"].long(), self.var.begin_ends, last_si)
        img = batch["image"]
        if img.shape[-1] != self.vqvae.image_size:
            raise ValueError(f"images are {img.shape[-1]} px but the VQVAE expects {self.vqvae.image_size} px "
                             "(set data.init_args.resolution)")
        return self.vqvae.img_to_idx(img, last_si)

    def ce(self, logits: torch.Tensor, idx: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        target = torch.cat(idx, 1)
        self.tokens_in_step = int(target.numel())  # predicted tokens of this step (perf/tokens_per_sec)
        loss, per_ce, per_acc = token_ce(logits, target, self.var.begin_ends, self.var.L, self.loss_norm,
                                         self.label_smoothing)
        out = {"loss": loss, "acc": per_acc.mean()}
        for k in range(len(per_ce)):
            out[f"ce_scale{k}"], out[f"acc_scale{k}"] = per_ce[k], per_acc[k]
        return out


class VARModule(VARBase):
    runtime_args = ("vqvae_weights", "var_weights", "cfg", "top_k", "top_p", "grad_checkpointing", "sampler",
                    "base_mismatch")

    def __init__(self, var_preset: str = "d16", var_overrides: dict | None = None, var_weights: str | None = None,
                 vqvae_preset: str = "vae_ch160v4096z32", vqvae_overrides: dict | None = None,
                 vqvae_weights: str | None = None, no_decay_keys: list[str] | None = None, **kwargs: Any):
        """``no_decay_keys``: parameter-name substrings kept out of weight decay (with every 1-D parameter); default
        VAR's own list (``VAR_NO_DECAY``), under which ``class_emb`` and ``word_embed`` are decayed as in VAR."""
        super().__init__(var_preset, var_overrides, var_weights, vqvae_preset, vqvae_overrides, vqvae_weights, **kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "var_net", "vqvae_net"])
        self.no_decay_keys = tuple(VAR_NO_DECAY if no_decay_keys is None else no_decay_keys)

    def param_groups(self) -> list[dict]:
        return decay_groups(self.var.named_parameters(), self.no_decay_keys)

    def model_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        idx = self.tokens(batch)
        x = self.vqvae.idx_to_var_input(idx)
        logits = self.var(batch["label"].long(), x)
        return self.ce(logits, idx)

    @torch.no_grad()
    def sample_images(self, batch: dict[str, Any], n: int) -> dict[str, torch.Tensor]:
        labels = batch["label"][:n].long()
        img = self.var.autoregressive_infer_cfg(len(labels), labels, vqvae=self.vqvae, g_seed=0, **self.sample_kwargs)
        return {"class_conditional": img}
