"""A tiny LoRA-on-a-frozen-base LightningModule for tests, plus builders of tiny diffusers/transformers models.

``TinyLoraModule``: a frozen tiny ``UNet2DConditionModel`` loaded from a local directory (written by the test with
``write_tiny_unet``), LoRA on its attention projections, trained with the ε-prediction loss on 8×8 "latents" pooled
from the shapes images; text conditioning is a fixed random embedding. Nothing here downloads anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ctrlgen.lightning_modules.common.base import BaseGenModule
from ctrlgen.lightning_modules.common.lora import add_lora
from ctrlgen.lightning_modules.common.pretrained import load_frozen

CROSS_DIM = 16
ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS_DIM,
                                attention_head_dim=4, norm_num_groups=8)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=8, sample_size=16)


def tiny_tokenizer(dir: str | Path):
    """A CLIP BPE tokenizer over single letters (vocab.json + an empty merges.txt written into ``dir``)."""
    from transformers import CLIPTokenizer

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    (dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (dir / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(dir / "vocab.json"), str(dir / "merges.txt"), model_max_length=8)


def tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(vocab_size=54, hidden_size=CROSS_DIM, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=8, projection_dim=16))


def write_tiny_unet(path: str | Path, seed: int = 0) -> Path:
    tiny_unet(seed).save_pretrained(str(path))
    return Path(path)


def write_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    """A tiny StableDiffusionPipeline saved with save_pretrained (model_index.json + five components)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    path = Path(path)
    pipe = StableDiffusionPipeline(unet=tiny_unet(seed), vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed),
                                   tokenizer=tiny_tokenizer(path / "_tok"), scheduler=DDPMScheduler(clip_sample=False, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return path


def unet_inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, 4, CROSS_DIM, generator=g))


class TinyLoraModule(BaseGenModule):
    """The UNet is a frozen component (``load_frozen``): eval mode but for its LoRA's dropout, only the LoRA in the
    optimizer and the checkpoint, the directory's sha256 recorded and checked on load."""

    runtime_args = ("unet_dir",)

    def __init__(self, unet_dir: str | None = None, lora_rank: int = 4, lora_alpha: float | None = None,
                 lora_targets: list[str] | None = None, lora_dropout: float = 0.0, lora_init: str = "gaussian",
                 adapter: str = "default", lora_seed: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        from diffusers import DDPMScheduler

        self.unet = load_frozen("UNet2DConditionModel", unet_dir, what="tiny UNet", example="write_tiny_unet(dir)",
                                config_key="model.init_args.unet_dir")
        add_lora(self.unet, lora_targets or ATTN_TARGETS, adapter, r=lora_rank, alpha=lora_alpha,
                 dropout=lora_dropout, init=lora_init, seed=lora_seed)
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
        g = torch.Generator().manual_seed(1)
        self.register_buffer("prompt_embeds", torch.randn(1, 4, CROSS_DIM, generator=g), persistent=False)
        self.seen_t: list[torch.Tensor] = []

    @staticmethod
    def latents(image: torch.Tensor) -> torch.Tensor:
        """(B,3,32,32) in [-1,1] → (B,4,8,8): 4×4 mean-pooled RGB plus its grey channel (a stand-in for a VAE)."""
        x = F.avg_pool2d(image, 4)
        return torch.cat([x, x.mean(1, keepdim=True)], 1)

    def model_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        z0 = self.latents(batch["image"].float())
        gen = self.ensure_generator()
        eps = torch.randn(z0.shape, generator=gen, device=z0.device)
        t = torch.randint(0, 1000, (z0.shape[0],), generator=gen, device=z0.device)
        if stage == "train":
            self.seen_t.append(t.cpu())
        zt = self.noise_scheduler.add_noise(z0, eps, t)
        ctx = self.prompt_embeds.expand(z0.shape[0], -1, -1)
        pred = self.unet(zt, t, encoder_hidden_states=ctx).sample
        return {"loss": F.mse_loss(pred, eps)}
