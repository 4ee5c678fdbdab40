"""``AgeLoRAModule``: DreamBooth-style LoRA fine-tuning of a diffusers ``UNet2DConditionModel`` for one age band
(agebooth.md §2), and a base-training mode for the demo's tiny text-to-image model.

Components come from a local diffusers directory (``pretrained``: ``unet/``, ``text_encoder/`` [+ ``text_encoder_2/``
for SDXL], ``tokenizer/`` [+ ``tokenizer_2/``], ``scheduler/``, optional ``vae/``; ``from_pretrained`` of a local path
only, ``common/pretrained.load_frozen``) or are injected from the config (``unet``, ``text_encoder``, ``vae``:
``class_path`` + ``init_args``; random weights); giving both for one component is an error. Without a tokenizer
directory the ``faces`` world's word-level tokenizer is used (``text.word_tokenizer``); without a VAE the UNet works
in pixel space (the demo).

- ``train_mode: lora`` (default): VAE, text encoder(s) and UNet are frozen components (``common/frozen.freeze``);
  a peft LoRA named ``adapter`` (rank 16, ``lora_alpha`` = rank → scale 1, on ``to_q, to_k, to_v, to_out.0``,
  A ~ N(0, 1/r²) gaussian init, B = 0) is injected into the UNet under ``lora_init_seed`` only, so every band starts
  from the same A. Only the LoRA reaches the optimizer and the checkpoints; at fit end it is exported in diffusers'
  LoRA format to ``export_dir`` (default ``<run dir>/lora/pytorch_lora_weights.safetensors``), loadable with
  ``pipe.load_lora_weights(dir, adapter_name=...)`` and by ``adapters.load_age_lora``.
- ``train_mode: full``: the whole UNet trains (text encoder and VAE stay frozen); at fit end the components are
  written with ``save_pretrained`` to ``export_dir`` (default ``<run dir>/base``): the directory a LoRA run's
  ``pretrained`` points at.

Loss: ε-prediction MSE (or v-prediction when the scheduler says so) at uniform timesteps, DDPM noising. Prompts:
``instance_prompt`` for every image (AgeBooth: "A person in sbu age.", encoded once and cached) or each sample's
caption; ``caption_dropout`` replaces captions by "" (classifier-free guidance for the demo base). SDXL (two text
encoders) adds the pooled embedding and time ids (resolution, resolution, 0, 0, resolution, resolution).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ctrlgen.lightning_modules.agebooth.sampling import denoise
from ctrlgen.lightning_modules.agebooth.text import (
    PromptEncoder,
    sdxl_time_ids,
    word_tokenizer,
)
from ctrlgen.lightning_modules.common.base import BaseGenModule
from ctrlgen.lightning_modules.common.frozen import freeze
from ctrlgen.lightning_modules.common.lora import add_lora, export_lora
from ctrlgen.lightning_modules.common.pretrained import load_frozen, resolve_dtype
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TRAIN_MODES = ("lora", "full")


def _component(pretrained: str | None, sub: str) -> bool:
    return pretrained is not None and (Path(pretrained).expanduser() / sub).is_dir()


class AgeLoRAModule(BaseGenModule):
    """One age band's LoRA (or the demo base). See the module docstring for every option."""

    runtime_args = ("pretrained", "export_dir", "sample_steps", "guidance")

    def __init__(self, pretrained: str | None = None, unet: nn.Module | None = None,
                 text_encoder: nn.Module | None = None, vae: nn.Module | None = None, tokenizer: str | None = None,
                 train_mode: str = "lora", adapter: str = "age", lora_rank: int = 16, lora_alpha: float | None = None,
                 lora_targets: list[str] | None = None, lora_dropout: float = 0.0, lora_init_seed: int = 0,
                 instance_prompt: str | None = None, stream: str | None = "images", image_key: str = "image",
                 caption_key: str = "caption", caption_dropout: float = 0.0, resolution: int = 512,
                 weights_dtype: str | None = None, vae_dtype: str | None = "fp32", gradient_checkpointing: bool = False,
                 scheduler_config: dict[str, Any] | None = None, export_dir: str | None = None,
                 sample_steps: int = 25, guidance: float = 1.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "unet", "text_encoder", "vae"])
        if train_mode not in TRAIN_MODES:
            raise ValueError(f"model.init_args.train_mode must be one of {TRAIN_MODES}, got {train_mode!r}")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"model.init_args.caption_dropout must be in [0, 1), got {caption_dropout}")
        self.train_mode, self.adapter, self.instance_prompt = train_mode, adapter, instance_prompt
        self.stream, self.image_key, self.caption_key = stream, image_key, caption_key
        self.caption_dropout, self.resolution, self.export_dir = caption_dropout, resolution, export_dir
        self.sample_steps, self.guidance = sample_steps, guidance
        dtype = resolve_dtype(weights_dtype)
        key = "model.init_args.pretrained"
        for name, given in (("unet", unet), ("text_encoder", text_encoder), ("vae", vae)):
            if given is not None and _component(pretrained, name):
                raise ValueError(f"model.init_args.{name} is given and {pretrained}/{name} exists too: give the "
                                 f"network or the pretrained directory, not both (set {name}: null)")
        if unet is None:
            if pretrained is None:
                raise ValueError("AgeLoRAModule needs model.init_args.pretrained (a local diffusers directory) or an "
                                 "injected model.init_args.unet")
            unet = load_frozen("UNet2DConditionModel", pretrained, subfolder="unet", dtype=dtype, config_key=key,
                               frozen=train_mode == "lora")
        if train_mode == "lora":
            freeze(unet)  # keeps a recorded source; an injected UNet becomes a frozen base of random weights
            add_lora(unet, list(lora_targets or ATTN_TARGETS), adapter, r=lora_rank, alpha=lora_alpha,
                     dropout=lora_dropout, init="gaussian", seed=lora_init_seed)
        else:
            unet.requires_grad_(True)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.unet = unet
        encoders, tokenizers = self._text(pretrained, text_encoder, tokenizer, dtype, key)
        self.text = PromptEncoder(tokenizers, encoders)
        if vae is None and _component(pretrained, "vae"):
            vae = load_frozen("AutoencoderKL", pretrained, subfolder="vae", dtype=resolve_dtype(vae_dtype),
                              config_key=key)
        self.vae = None if vae is None else freeze(vae)
        if scheduler_config is None and _component(pretrained, "scheduler"):
            scheduler_config = dict(load_frozen("DDPMScheduler", pretrained, subfolder="scheduler").config)
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(dict(scheduler_config or {"num_train_timesteps": 1000}))
        self._instance: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _text(pretrained: str | None, text_encoder: nn.Module | None, tokenizer: str | None, dtype, key: str):
        """(encoders, tokenizers): ``text_encoder`` [+ ``text_encoder_2``] of ``pretrained`` or the injected one."""
        if text_encoder is not None:
            encoders = [freeze(text_encoder)]
        elif _component(pretrained, "text_encoder"):
            encoders = [load_frozen("transformers.CLIPTextModel", pretrained, subfolder="text_encoder", dtype=dtype,
                                    config_key=key)]
            if _component(pretrained, "text_encoder_2"):
                encoders.append(load_frozen("transformers.CLIPTextModelWithProjection", pretrained,
                                            subfolder="text_encoder_2", dtype=dtype, config_key=key))
        else:
            raise ValueError("AgeLoRAModule needs a text encoder: model.init_args.text_encoder or a pretrained "
                             "directory with text_encoder/")
        if tokenizer is not None:
            toks = [load_frozen("transformers.AutoTokenizer", tokenizer)]
        elif _component(pretrained, "tokenizer"):
            toks = [load_frozen("transformers.AutoTokenizer", pretrained, subfolder="tokenizer")]
        else:
            toks = [word_tokenizer(max_length=getattr(encoders[0].config, "max_position_embeddings", 12))]
        if len(encoders) == 2:
            toks.append(load_frozen("transformers.AutoTokenizer", pretrained, subfolder="tokenizer_2"))
        return encoders, toks

    # ---------------------------------------------------------------------------------------------------- helpers
    @property
    def sdxl(self) -> bool:
        return self.text.sdxl

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning for ``prompts`` (the cached instance prompt when set and every prompt is it)."""
        if self.instance_prompt is not None and all(p == self.instance_prompt for p in prompts):
            if self._instance is None or self._instance["prompt_embeds"].device != self.device:
                self._instance = self.text([self.instance_prompt])
            return {k: v.expand(len(prompts), *v.shape[1:]) for k, v in self._instance.items()}
        return self.text(prompts)

    @torch.no_grad()
    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → the UNet's space: VAE latents (a posterior sample drawn with the module's generator)
        × scaling factor, or the pixels themselves without a VAE."""
        if self.vae is None:
            return images
        x = images.to(self.vae.dtype)
        dist = self.vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=self.ensure_generator(),
                                               device=x.device, dtype=x.dtype)
        return (z * self.vae.config.scaling_factor).float()

    def _batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.stream is not None and self.stream in batch:
            return batch[self.stream]
        return batch

    def _prompts(self, b: dict[str, Any], n: int, stage: str) -> list[str]:
        if self.instance_prompt is not None:
            prompts = [self.instance_prompt] * n
        else:
            if self.caption_key not in b:
                raise KeyError(f"batch has no {self.caption_key!r} (keys {sorted(b)}): map the shards' txt to it "
                               f"(data streams keys {{txt: {self.caption_key}}}) or set model.init_args.instance_prompt")
            prompts = list(b[self.caption_key])
        if stage == "train" and self.caption_dropout > 0:
            drop = torch.rand(n, generator=self.ensure_generator(), device=self.device) < self.caption_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        return prompts

    def unet_forward(self, x: torch.Tensor, t: torch.Tensor, emb: dict[str, torch.Tensor]) -> torch.Tensor:
        dt = next(self.unet.parameters()).dtype
        added = None
        if self.sdxl:
            added = {"text_embeds": emb["pooled_prompt_embeds"].to(dt),
                     "time_ids": sdxl_time_ids(self.resolution, x.shape[0], x.device, dt)}
        return self.unet(x.to(dt), t, encoder_hidden_states=emb["prompt_embeds"].to(dt),
                         added_cond_kwargs=added).sample.float()

    # ------------------------------------------------------------------------------------------------------ steps
    def model_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        b = self._batch(batch)
        images = b[self.image_key].to(self.device).float()
        emb = self.encode_prompts(self._prompts(b, images.shape[0], stage))
        z0 = self.to_latents(images)
        gen = self.ensure_generator()
        noise = torch.randn(z0.shape, generator=gen, device=z0.device)
        n_t = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, n_t, (z0.shape[0],), generator=gen, device=z0.device)
        zt = self.noise_scheduler.add_noise(z0, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(z0, noise, t)
        else:
            target = noise
        return {"loss": F.mse_loss(self.unet_forward(zt, t, emb), target)}

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int = 0, negative: str = "") -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] for ``prompts`` with the active adapters (DDIM, ``sample_steps``,
        ``guidance``), from noise seeded by ``seed``."""
        c = self.unet.config
        side = self.resolution // (8 if self.vae is not None else 1)
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(len(prompts), c.in_channels, side, side, generator=g).to(self.device)
        uncond = self.encode_prompts([negative]) if self.guidance != 1.0 else None
        return denoise(self.unet, self.noise_scheduler.config, noise, self.encode_prompts(prompts), uncond,
                       self.guidance, self.sample_steps, self.vae, self.resolution)

    @torch.no_grad()
    def sample_images(self, batch: dict[str, Any], n: int) -> dict[str, torch.Tensor]:
        b = self._batch(batch)
        k = min(n, b[self.image_key].shape[0])
        prompts = self._prompts(b, k, "val")[:k]
        return {"real": (b[self.image_key][:k].float() + 1) / 2, "generated": (self.generate(prompts) + 1) / 2}

    # ---------------------------------------------------------------------------------------------------- export
    def export_path(self) -> Path:
        if self.export_dir is not None:
            return Path(self.export_dir)
        root = Path(self.trainer.default_root_dir if self._trainer is not None else ".")
        return root / ("lora" if self.train_mode == "lora" else "base")

    @rank_zero_only
    def export(self, path: str | Path | None = None) -> Path:
        """LoRA mode: the adapter in diffusers' format (returns the .safetensors file); full mode: every component
        with ``save_pretrained`` (returns the directory)."""
        path = Path(path) if path is not None else self.export_path()
        if self.train_mode == "lora":
            return export_lora(path, {"unet": self.unet}, self.adapter)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(str(path / "unet"))
        for i, (enc, tok) in enumerate(zip(self.text.encoders, self.text.tokenizers)):
            suffix = "" if i == 0 else f"_{i + 1}"
            enc.save_pretrained(str(path / f"text_encoder{suffix}"))
            tok.save_pretrained(str(path / f"tokenizer{suffix}"))
        if self.vae is not None:
            self.vae.save_pretrained(str(path / "vae"))
        self.noise_scheduler.save_pretrained(str(path / "scheduler"))
        return path

    def on_train_end(self) -> None:
        self.export()
