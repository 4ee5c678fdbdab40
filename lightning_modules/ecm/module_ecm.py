"""``ECMModule``: control adapters on a frozen VAR (ecm.md §2), trained with early-centric truncation, sampled with a
per-scale temperature schedule; canny F1 of controlled vs uncontrolled samples at test time.

Frozen base: VAR and VQVAE are built from presets, loaded from their own local files, kept in eval mode without grads,
out of the optimizer and out of this module's checkpoints. ``finetune_base: true`` is the full-fine-tune baseline: the
same control net and data, the VAR trainable too, full sequences (cost/quality comparison in one framework).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ctrlgen.lightning_modules.common.base import decay_groups, derive_seed, global_seed
from ctrlgen.lightning_modules.common.frozen import freeze
from ctrlgen.lightning_modules.ecm.bases import load_weights
from ctrlgen.lightning_modules.ecm.control import ECMControlNet
from ctrlgen.lightning_modules.ecm.module_var import VARBase
from ctrlgen.lightning_modules.ecm.sampling import (DEFAULT_TRUNC_PROBS, draw_trunc_scale, normalize_trunc_probs,
                                            temperature_schedule, trunc_generator)

_NO_DECAY = ("gates", "gate_in", "type_embed", "pos_embed", "scale_mul", "class_emb", "lvl_embed", "pos_")


class ECMModule(VARBase):
    runtime_args = ("var_weights", "vqvae_weights", "cfg", "top_k", "top_p", "grad_checkpointing", "sampler",
                    "base_mismatch", "temp_schedule", "temp_high", "temp_low", "temp_switch_scale", "cfg_control",
                    "eval_base", "distribution_metrics", "inception_weights", "depth_estimator_dir", "edge_extractor",
                    "val_control_batches")

    def __init__(self, var_preset: str = "d16", var_overrides: dict | None = None, var_weights: str | None = None,
                 vqvae_preset: str = "vae_ch160v4096z32", vqvae_overrides: dict | None = None,
                 vqvae_weights: str | None = None, control: dict | None = None,
                 condition_types: list[str] | None = None, finetune_base: bool = False, early_centric: bool | None = None,
                 trunc_probs: dict[int, float] | None = None, temp_schedule: str = "step", temp_high: float = 1.0,
                 temp_low: float = 0.8, temp_switch_scale: int | None = None, cfg_control: str = "both",
                 edge_extractor: str = "cv2_canny_100_200", eval_base: bool = True,
                 distribution_metrics: bool = False, inception_weights: str | None = None,
                 fid_feature: torch.nn.Module | None = None, depth_estimator_dir: str | None = None,
                 sync_across_ranks: bool = True, cond_encoder_weights: str | None = None, val_control_batches: int = 1,
                 **kwargs: Any):
        """``sync_across_ranks``: every DDP rank truncates at the same scale per step (seeded by seed and step: no
        stragglers, spec §2.3); false draws s per rank (seed, rank, step). ``cond_encoder_weights``: a local file to
        initialise the condition encoder from (a ``ViTEncoder`` state dict, ``.pth``/``.safetensors``, or an
        ``ECMModule`` ``.ckpt``, whose ``control.cond_encoder.*`` is used), loaded strictly; it then trains.
        ``val_control_batches``: validation samples the first N batches of the (fixed) validation split with control
        and logs ``val/canny_f1`` / ``val/depth_rmse`` on them (spec §2.5); 0 = teacher-forced CE only."""
        super().__init__(var_preset, var_overrides, var_weights, vqvae_preset, vqvae_overrides, vqvae_weights, **kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "fid_feature", "var_net", "vqvae_net"])
        self.condition_types = list(condition_types or ["canny"])
        self.control = ECMControlNet(self.var, num_condition_types=len(self.condition_types), **(control or {}))
        self.cond_encoder_info = None
        if cond_encoder_weights:
            self.cond_encoder_info = load_weights(self.control.cond_encoder, cond_encoder_weights,
                                                  "control.cond_encoder.")
            rank_zero_info(f"ECMModule: condition encoder initialised from {self.cond_encoder_info['path']}")
        self.sync_across_ranks = sync_across_ranks
        self.control.grad_checkpointing = self.var.grad_checkpointing
        self.finetune_base = finetune_base
        self.var.cond_drop_rate = 0.0  # class dropout is applied once, by the control net (which copied the rate)
        if not finetune_base:
            freeze(self.var, source=self.var_info, config_key="model.init_args.var_weights")
            if var_weights is None:
                rank_zero_warn("ECMModule: model.init_args.var_weights is not set: adapters train on a RANDOM frozen VAR")
        K = len(self.var.patch_nums)
        # default: early-centric for ECM, full sequences for the full-fine-tune baseline; an explicit true with
        # finetune_base is honoured (a truncated full fine-tune is an ablation, not the baseline)
        self.early_centric = (not finetune_base) if early_centric is None else bool(early_centric)
        if finetune_base and self.early_centric:
            rank_zero_warn("ECMModule: finetune_base with early_centric: true trains the whole VAR on truncated "
                           "sequences (an ablation); the full-fine-tune baseline of ecm.md uses full sequences "
                           "(leave early_centric unset or false)")
        self.trunc_probs = normalize_trunc_probs(trunc_probs or _default_trunc(K), K)
        # the histogram of s (callbacks.StepValueHistogram(value=kept_scale)): bins 0..K-1, the scales that occur
        self.kept_scale_bins = K
        self.kept_scale_support = tuple(sorted(self.trunc_probs)) if self.early_centric else (K - 1,)
        switch = K - 2 if temp_switch_scale is None else temp_switch_scale
        self.temperatures = temperature_schedule(K, temp_schedule, temp_high, temp_low, switch)
        self.cfg_control, self.edge_extractor, self.eval_base = cfg_control, edge_extractor, eval_base
        from ctrlgen.lightning_modules.metrics.control import CannyF1, MeanSEM

        self.f1_ecm = CannyF1(edge_extractor)
        self.f1_base = CannyF1(edge_extractor)
        self.f1_margin = MeanSEM()  # paired per image: F1 controlled - F1 uncontrolled (same seeds)
        if val_control_batches < 0:
            raise ValueError(f"model.init_args.val_control_batches must be >= 0, got {val_control_batches}")
        self.val_control_batches = val_control_batches
        self.val_f1 = CannyF1(edge_extractor)  # controlled samples of the fixed validation subset
        self.gen_metrics = self.depth_rmse = self.val_depth_rmse = None
        if distribution_metrics:  # FID + P/R (k=3) [+ IS with Inception] from one feature pass (platform.md §5)
            from ctrlgen.lightning_modules.metrics.distribution import GenerativeMetrics

            self.gen_metrics = GenerativeMetrics(fid_feature, inception_weights=inception_weights,
                                                 compute_is=fid_feature is None)
        if "depth" in self.condition_types and depth_estimator_dir:
            from ctrlgen.lightning_modules.metrics.control import DepthRMSE, TransformersDepthEstimator

            estimator = TransformersDepthEstimator(depth_estimator_dir)
            self.depth_rmse, self.val_depth_rmse = DepthRMSE(estimator), DepthRMSE(estimator)

    def param_groups(self) -> list[dict]:
        """ECM's no-decay list for the control net; with ``finetune_base`` the VAR follows VAR's own list."""
        return decay_groups(((n, p) for n, p in self.named_parameters() if not n.startswith("vqvae.")), _NO_DECAY,
                            {"var.": self.no_decay_keys})

    # ------------------------------------------------------------------------------------------------------ steps
    def check_datamodule(self, dm: Any) -> None:
        """Data and model must agree on the condition types (their order is the type-embedding index and the metric
        routing) and, when the loader extracts canny maps itself, on the edge extractor (the F1 metric's)."""
        super().check_datamodule(dm)
        pairs = [("condition_types", self.condition_types)]
        if getattr(dm, "canny_on_the_fly", False):
            pairs.append(("edge_extractor", self.edge_extractor))
        for key, mine in pairs:
            theirs = getattr(dm, key, None)
            if theirs is not None and (list(theirs) if isinstance(mine, list) else theirs) != mine:
                raise ValueError(f"data.init_args.{key} {theirs!r} differs from model.init_args.{key} {mine!r}: set "
                                 "both to the same value (same order)")

    def _type_idx(self, batch: dict[str, Any]) -> torch.Tensor | None:
        return batch["cond_type"].long() if self.control.type_embed is not None else None

    def trunc_scale(self, step: int, rank: int) -> int:
        """Last kept scale s for optimizer step ``step`` (spec §2.3): seeded by (seed, step), the same on every rank,
        or with ``sync_across_ranks: false`` by (seed, rank, step); a resumed run draws the same s again."""
        own = None if self.sync_across_ranks else trunc_generator(derive_seed(global_seed(), rank), step)
        return draw_trunc_scale(self.trunc_probs, global_seed(), step, generator=own)

    def kept_scale(self, step: int, rank: int) -> int:
        """Last scale a training batch of optimizer step ``step`` on ``rank`` keeps: ``trunc_scale`` when
        early-centric, else the last scale (full sequences)."""
        return self.trunc_scale(step, rank) if self.early_centric else len(self.var.patch_nums) - 1

    def model_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        s = self.trunc_scale(self.global_step, self.global_rank) if stage == "train" and self.early_centric else None
        idx = self.tokens(batch, s)
        x = self.vqvae.idx_to_var_input(idx)
        logits = self.control(self.var, batch["label"].long(), x, cond_img=batch["cond"], prog_si=s,
                              type_idx=self._type_idx(batch))
        out = self.ce(logits, idx)
        out["tokens"] = float(self.tokens_in_step)  # set by ce(): B x kept tokens; a number (synced on any device)
        if stage == "train":
            out["trunc_scale"] = float(len(self.var.patch_nums) - 1 if s is None else s)
            for j, g in enumerate(self.control.gate_values()):
                out[f"gate{j}"] = g
        return out

    def _score_control(self, batch: dict[str, Any], images: torch.Tensor, stage: str, f1: Any,
                       depth: Any) -> torch.Tensor | None:
        """Canny F1 / depth RMSE of controlled ``images``, each on the rows whose condition map is of its type; the
        canny rows (None when there are none)."""
        canny = self._rows_of(batch, "canny")
        if canny is not None:
            f1.update(images[canny], batch["cond"][canny, 0] > 0)
            self.log(f"{stage}/canny_f1", f1, on_epoch=True, batch_size=len(canny))
        rows = self._rows_of(batch, "depth") if depth is not None else None
        if rows is not None:
            depth.update(images[rows], batch["cond"][rows, 0].add(1).div(2))
            self.log(f"{stage}/depth_rmse", depth, on_epoch=True, batch_size=len(rows))
        return canny

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Teacher-forced CE per scale; on the first ``val_control_batches`` batches also the control metrics of
        controlled samples (the eval split and the per-batch seeds are fixed, so every validation scores the same
        images' conditions: a curve over training)."""
        loss = self._step(batch, "val")
        if dataloader_idx == 0 and batch_idx < self.val_control_batches:
            self._score_control(batch, self.sample(batch, control=True), "val", self.val_f1, self.val_depth_rmse)
        return loss

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Teacher-forced CE per scale, then metrics of controlled samples (and of the base without control)."""
        loss = self._step(batch, "test")
        ecm = self.sample(batch, control=True)
        canny = self._score_control(batch, ecm, "test", self.f1_ecm, self.depth_rmse)
        if canny is not None and self.eval_base:  # paired: the same seeds without control
            self.f1_base.update(self.sample(batch, control=False)[canny], batch["cond"][canny, 0] > 0)
            self.log("test/canny_f1_base", self.f1_base, on_epoch=True, batch_size=len(canny))
            self.f1_margin.update(self.f1_ecm.last_per_image - self.f1_base.last_per_image)
        if self.gen_metrics is not None:
            self.gen_metrics.update(_uint8(batch["image"].add(1).div(2)), real=True)
            self.gen_metrics.update(_uint8(ecm), real=False)
        return loss

    def _rows_of(self, batch: dict[str, Any], name: str) -> torch.Tensor | None:
        """Indices of the batch rows conditioned on ``name`` (all rows with one type); None when there are none."""
        if name not in self.condition_types:
            return None
        rows = torch.arange(len(batch["label"]), device=batch["cond"].device)
        if len(self.condition_types) > 1:
            rows = rows[torch.as_tensor(batch["cond_type"], device=rows.device) == self.condition_types.index(name)]
        return rows if len(rows) else None

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()  # overall test/loss when there are several test loaders
        if self.eval_base and "canny" in self.condition_types:  # paired margin ± SEM over all ranks' test images
            margin, sem = self.f1_margin.compute()
            self.log("test/canny_f1_margin", float(margin), sync_dist=False)
            self.log("test/canny_f1_margin_sem", float(sem), sync_dist=False)
            self.f1_margin.reset()
        if self.gen_metrics is not None:
            for k, v in self.gen_metrics.compute().items():
                self.log(f"test/{k}", float(v), sync_dist=False)
            self.gen_metrics.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Controlled samples for the batch; a batch whose images all exist (``_done``, PredictionWriter) is skipped.
        A partly written batch is regenerated whole (same seed → same images) and only the missing ones returned."""
        done = batch.get("_done", torch.zeros(len(batch["key"]), dtype=torch.bool)).bool().cpu()
        if done.all():
            return {"key": []}
        img, todo = self.sample(batch, control=True).cpu(), (~done).nonzero().flatten().tolist()
        return {"key": [batch["key"][i] for i in todo], "image": img[todo], "cond": batch["cond"].cpu()[todo]}

    # --------------------------------------------------------------------------------------------------- sampling
    def _generator(self, batch: dict[str, Any]) -> torch.Generator:
        """Deterministic per batch content: the same keys give the same images on any rank or rerun."""
        seed = zlib.crc32("|".join(map(str, batch.get("key", []))).encode())
        return torch.Generator(device=self.device).manual_seed(seed)

    @torch.no_grad()
    def sample(self, batch: dict[str, Any], control: bool = True, n: int | None = None) -> torch.Tensor:
        """Images in [0, 1] for the batch's labels (and conditions when ``control``); same seed with or without."""
        labels, cond = batch["label"][:n].long(), batch["cond"][:n]
        kw = {**self.sample_kwargs, "generator": self._generator(batch), "temperature_schedule": self.temperatures}
        if control:
            tidx = self._type_idx(batch)
            return self.control.sample(self.var, self.vqvae, len(labels), labels, cond_img=cond,
                                       type_idx=None if tidx is None else tidx[:n], cfg_control=self.cfg_control, **kw)
        return self.var.autoregressive_infer_cfg(len(labels), labels, vqvae=self.vqvae, **kw)

    @torch.no_grad()
    def sample_images(self, batch: dict[str, Any], n: int) -> dict[str, torch.Tensor]:
        from ctrlgen.lightning_modules.metrics.edges import get_edge_extractor

        ecm = self.sample(batch, True, n)
        edges = get_edge_extractor(self.edge_extractor)(ecm).float().div(255).expand(-1, 3, -1, -1)
        rows = [batch["cond"][:n].add(1).div(2), ecm, edges.to(ecm.device)]
        if self.eval_base:
            rows.append(self.sample(batch, False, n))
        return {"condition_ecm_edges_base": torch.cat(rows)}


def _uint8(img01: torch.Tensor) -> torch.Tensor:
    return img01.clamp(0, 1).mul(255).round().to(torch.uint8)


def _default_trunc(num_scales: int) -> dict[int, float]:
    """ecm.md §2.3 for the 10-scale schedule; for other schedules the same shape: 0.2/0.6/0.2 on K−5, K−3, K−1."""
    if num_scales == 10:
        return dict(DEFAULT_TRUNC_PROBS)
    ks = [max(0, num_scales - 5), max(0, num_scales - 3), num_scales - 1]
    out: dict[int, float] = {}
    for k, p in zip(ks, (0.2, 0.6, 0.2)):
        out[k] = out.get(k, 0.0) + p
    return out
