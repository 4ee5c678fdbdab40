"""``DMD2Module``: DMD2 few-step distillation of a diffusers ``UNet2DConditionModel`` (spec shared/specs/defocus.md
§8, §9; [ref-code] tianweiy/DMD2 8d8fa55). The later ``DefocusModule`` subclasses it.

Networks (``optimizer_params``: ``generator`` then ``guidance``, the order of optimizer states in checkpoints):

- ``teacher``: the real score, frozen (``common/frozen.freeze``: eval, no grad, out of optimizers and checkpoints; the
  checkpoint records its path + sha256), cast to ``teacher_dtype`` (bf16 on GPUs), used with CFG ``cfg_real``;
- ``generator``: a trainable copy of the teacher, the few-step generator (timesteps ``dmd2.generator_timesteps``);
- ``guidance``: ``fake_score`` (a trainable copy of the teacher, no CFG) and ``head`` (``dmd2_nets.GANHead`` on the
  fake score's mid-block output; ``latent_gan: false`` leaves it out), stepped by one optimizer.

Weights: ``pretrained`` (a local diffusers pipeline directory: ``unet/``, ``text_encoder*/``, ``tokenizer*/``, optional
``vae/`` and ``scheduler/``; SDXL when the UNet has ``addition_embed_type: text_time``) or an injected ``teacher`` UNet
plus ``prompt_encoder`` (YAML ``class_path``: tiny random UNets and ``HashPromptEncoder`` on CPU).

One iteration (``train_iteration``, [ref-code] main/train_sd.py): prompts → text conditioning (frozen encoder);
backward simulation depth k from ``iteration_generator`` (identical on every rank), the first k generator steps without
grad from per-rank noise, then the generator forward at t_k (with grad only on generator turns, ``update_every:
{generator: 5}``). Generator turn: DM loss (``dmd2.dm_gradient`` with the CFG'd teacher and the fake score at t ∈
U{20…980}) + ``gen_gan_weight`` × G-GAN loss (head on the noised generator output), the whole guidance module toggled
off by ``update``. Guidance, every iteration: ε-MSE of the fake score on the detached generator output (t ∈ U{0…999})
+ ``disc_gan_weight`` × D loss on noised real latents (their own captions) and noised generator latents.
``backsim: false`` noises the real latents to t_k instead (DMD2 without backward simulation).

Real data: ``batch["real"]["latent"]`` (pre-encoded, scaled VAE latents, the reference's LMDB) or
``batch["real"]["image"]`` in [-1, 1] encoded by the frozen VAE; captions in ``batch["real"]["caption"]``. Prompts in
``batch["prompts"]["prompt"]``. ``ctrlgen.datamodules.multi.MultiStreamDataModule`` streams ``prompts`` and ``real``
give this shape.

Strategies: DDP needs ``find_unused_parameters: true`` (configs/strategy/dmd2_ddp.yaml). ``ModelParallelStrategy``
(configs/strategy/dmd2_fsdp.yaml): ``configure_model`` applies FSDP2 ``fully_shard`` to every down/mid/up block and
then the root of ``generator`` and ``guidance.fake_score`` (and the head with the fake score's root), each on its own;
the frozen teacher, VAE and text encoders stay unsharded, replicated on every rank. EMA of the generator: the
``ctrlgen.callbacks.EMA`` callback with ``optimizer: generator`` ([design]: the reference keeps none).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from ctrlgen.datamodules.seeding import derive_seed, global_seed
from ctrlgen.lightning_modules.common.frozen import (
    CONFIG_KEY_ATTR,
    FROZEN_ATTR,
    SOURCE_ATTR,
    freeze,
)
from ctrlgen.lightning_modules.common.manual import ManualOptimModule
from ctrlgen.lightning_modules.common.pretrained import load_frozen, resolve_dtype
from ctrlgen.lightning_modules.defocus import dmd2
from ctrlgen.lightning_modules.defocus.dmd2_nets import (
    CLIPPromptEncoder,
    GANHead,
    mid_resolution_of,
    unet_eps,
    unet_mid_features,
)
from torch import nn

KEY = "model.init_args.pretrained"


def trainable_copy(module: nn.Module) -> nn.Module:
    """A float32 deep copy of a (frozen) module that trains: requires_grad on, frozen marks removed."""
    out = copy.deepcopy(module).float()
    for m in out.modules():
        for attr in (FROZEN_ATTR, SOURCE_ATTR, CONFIG_KEY_ATTR):
            if attr in m.__dict__:
                delattr(m, attr)
    return out.requires_grad_(True).train()


class DMD2Module(ManualOptimModule):
    """DMD2 on diffusers UNets: frozen teacher, few-step generator, fake score + GAN head (module docstring)."""

    runtime_args = ManualOptimModule.runtime_args + ("pretrained",)

    def __init__(self, teacher: nn.Module | None = None, prompt_encoder: nn.Module | None = None,
                 pretrained: str | None = None, teacher_dtype: str = "fp32", num_steps: int = 4,
                 cfg_real: float = 8.0, uncond: str = "zeros", backsim: bool = True, latent_gan: bool = True,
                 dm_weight: float = 1.0, gen_gan_weight: float = 5.0e-3, disc_gan_weight: float = 1.0e-2,
                 head_groups: int = 32, latent_size: int | None = None, gradient_checkpointing: bool = False,
                 **kwargs: Any):
        """``uncond``: ``zeros`` (all-zero text and pooled embeddings: the SDXL recipe) | ``empty`` (the encoding of
        ""); ``latent_size``: the generator's latent side (default the UNet's ``sample_size``); other keyword
        arguments go to ``ManualOptimModule`` (optimizers, schedulers, update_every, clip_norm, max_iterations, ...)."""
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizers", "schedulers", "teacher", "prompt_encoder"])
        if uncond not in ("zeros", "empty"):
            raise ValueError(f"model.init_args.uncond must be 'zeros' or 'empty', got {uncond!r}")
        self.vae: nn.Module | None = None
        alphas = dmd2.scaled_linear_alphas()
        if pretrained is not None:
            root = Path(pretrained).expanduser()
            teacher = load_frozen("UNet2DConditionModel", root, subfolder="unet", dtype="fp32", config_key=KEY,
                                  what="teacher UNet (pretrained/unet)")
            if prompt_encoder is None:
                prompt_encoder = CLIPPromptEncoder(root, sdxl=teacher.config.addition_embed_type == "text_time")
            if (root / "vae").is_dir():
                self.vae = load_frozen("AutoencoderKL", root, subfolder="vae", dtype="fp32", config_key=KEY)
            if (root / "scheduler").is_dir():
                sched = load_frozen("DDPMScheduler", root, subfolder="scheduler")
                alphas = sched.alphas_cumprod.double()
        if teacher is None or prompt_encoder is None:
            raise ValueError("DMD2Module needs model.init_args.pretrained (a local diffusers pipeline directory) or "
                             "both model.init_args.teacher (a UNet2DConditionModel) and model.init_args.prompt_encoder")
        self.generator = trainable_copy(teacher)
        fake = trainable_copy(teacher)
        self.latent_size = int(latent_size or teacher.config.sample_size)
        guidance: dict[str, nn.Module] = {"fake_score": fake}
        if latent_gan:
            mid = mid_resolution_of(teacher, self.latent_size)
            guidance["head"] = GANHead(teacher.config.block_out_channels[-1], mid, head_groups)
        self.guidance = nn.ModuleDict(guidance)
        if gradient_checkpointing:
            self.generator.enable_gradient_checkpointing()
            fake.enable_gradient_checkpointing()
        self.teacher = teacher if getattr(teacher, FROZEN_ATTR, False) else freeze(teacher)
        self.teacher.to(resolve_dtype(teacher_dtype))
        self.prompt_encoder = prompt_encoder if getattr(prompt_encoder, FROZEN_ATTR, False) else freeze(prompt_encoder)
        self.register_buffer("alphas", alphas, persistent=False)
        self.timesteps = dmd2.generator_timesteps(num_steps, len(alphas))
        self.channels = int(teacher.config.in_channels)
        self.sdxl = teacher.config.addition_embed_type == "text_time"
        self.num_steps, self.cfg_real, self.uncond, self.backsim = num_steps, float(cfg_real), uncond, bool(backsim)
        self.latent_gan, self.dm_weight = bool(latent_gan), float(dm_weight)
        self.gen_gan_weight, self.disc_gan_weight = float(gen_gan_weight), float(disc_gan_weight)
        self.last_backsim: int | None = None  # this iteration's backward-simulation depth (rank-identical)

    # ---------------------------------------------------------------------------------------------------- wiring
    def optimizer_params(self) -> dict[str, Any]:
        return {"generator": self.generator, "guidance": self.guidance}

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: FSDP2 ``fully_shard`` of the generator and the fake score per block, then
        their roots (the head shards with the fake score's root); the frozen parts stay replicated."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is None or getattr(self.generator, "_ctrlgen_sharded", False):
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dp = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for unet in (self.generator, self.guidance["fake_score"]):
            for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
                fully_shard(block, mesh=dp, mp_policy=mp)
        fully_shard(self.generator, mesh=dp, mp_policy=mp)
        fully_shard(self.guidance, mesh=dp, mp_policy=mp)
        self.generator._ctrlgen_sharded = True

    # ---------------------------------------------------------------------------------------------- conditioning
    def condition(self, prompts: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(cond, uncond) UNet conditioning dicts for ``prompts`` (no grad)."""
        enc = self.prompt_encoder.encode(list(prompts))
        if self.uncond == "zeros":
            un = {k: None if v is None else torch.zeros_like(v) for k, v in enc.items()}
        else:
            un = self.prompt_encoder.encode([""] * len(prompts))
        return self._as_cond(enc), self._as_cond(un)

    def _as_cond(self, enc: dict[str, Any]) -> dict[str, Any]:
        ehs = enc["encoder_hidden_states"].to(self.device)
        cond: dict[str, Any] = {"encoder_hidden_states": ehs, "added_cond_kwargs": None}
        if self.sdxl:  # [ref-code] SDXL time ids (H, W, 0, 0, H, W) at the image size
            side = self.latent_size * (2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae else 8)
            ids = torch.tensor([side, side, 0, 0, side, side], device=self.device, dtype=ehs.dtype)
            cond["added_cond_kwargs"] = {"text_embeds": enc["text_embeds"].to(self.device),
                                         "time_ids": ids.expand(ehs.shape[0], -1)}
        return cond

    @staticmethod
    def _cat(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = {"encoder_hidden_states": torch.cat([a["encoder_hidden_states"], b["encoder_hidden_states"]])}
        ad, bd = a.get("added_cond_kwargs"), b.get("added_cond_kwargs")
        out["added_cond_kwargs"] = None if ad is None else {k: torch.cat([ad[k], bd[k]]) for k in ad}
        return out

    # ------------------------------------------------------------------------------------------------------ nets
    def generator_eps(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return unet_eps(self.generator, x, t, cond)

    def generator_x0(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return dmd2.eps_to_x0(x, self.generator_eps(x, t, cond), t, self.alphas)

    def real_eps(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], uncond: dict[str, Any]) -> torch.Tensor:
        """The teacher's CFG'd ε (one batched call over uncond and cond)."""
        eps = unet_eps(self.teacher, torch.cat([x, x]), torch.cat([t, t]), self._cat(uncond, cond))
        eps_u, eps_c = eps.chunk(2)
        return dmd2.cfg(eps_u, eps_c, self.cfg_real)

    def logits(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return self.guidance["head"](unet_mid_features(self.guidance["fake_score"], x, t, cond).float())

    def randn(self, shape: tuple[int, ...], gen: torch.Generator | None = None) -> torch.Tensor:
        gen = gen or self.ensure_generator()
        return torch.randn(shape, generator=gen, device=gen.device).to(self.device)

    def timesteps_in(self, n: int, bounds: tuple[int, int], gen: torch.Generator | None = None) -> torch.Tensor:
        return dmd2.sample_timesteps(n, bounds, gen or self.ensure_generator(), self.device)

    # -------------------------------------------------------------------------------------------------- data
    def real_latents(self, real: dict[str, Any]) -> torch.Tensor:
        if "latent" in real:
            return real["latent"].to(self.device).float()
        if "image" in real and self.vae is not None:
            with torch.no_grad():
                lat = self.vae.encode(real["image"].to(self.device).float()).latent_dist.sample(
                    generator=self.ensure_generator())
            return lat * self.vae.config.scaling_factor
        raise KeyError("DMD2Module: batch['real'] needs 'latent' (scaled VAE latents) or 'image' with a VAE")

    # ---------------------------------------------------------------------------------------------- training
    def generator_input(self, n: int, k: int, cond: dict[str, Any], real: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's input at t_k: backward simulation from noise, or (``backsim: false``) noised real latents."""
        shape = (n, self.channels, self.latent_size, self.latent_size)
        if self.backsim or k == 0:
            return dmd2.backward_simulate(lambda x, t: self.generator_eps(x, t, cond), self.randn(shape),
                                          self.timesteps, k, self.alphas, self.ensure_generator())
        if real is None:
            raise KeyError("DMD2Module: backsim=false needs real latents in batch['real']")
        t = torch.full((n,), self.timesteps[k], device=self.device, dtype=torch.long)
        return dmd2.add_noise(real[:n], self.randn(shape), t, self.alphas), t

    def generator_loss(self, x0: torch.Tensor, cond: dict[str, Any], uncond: dict[str, Any]) -> torch.Tensor:
        n = x0.shape[0]
        with torch.no_grad():
            t = self.timesteps_in(n, dmd2.DM_RANGE)
            x_t = dmd2.add_noise(x0.detach(), self.randn(tuple(x0.shape)), t, self.alphas)
            x0_fake = dmd2.eps_to_x0(x_t, unet_eps(self.guidance["fake_score"], x_t, t, cond), t, self.alphas)
            x0_real = dmd2.eps_to_x0(x_t, self.real_eps(x_t, t, cond, uncond), t, self.alphas)
            grad = dmd2.dm_gradient(x0.detach().float(), x0_fake, x0_real)
        dm = dmd2.dm_loss(x0, grad)
        self.log("train/dm_loss", dm.detach(), on_step=True, on_epoch=False)
        loss = self.dm_weight * dm
        if self.latent_gan:
            tg = self.timesteps_in(n, dmd2.FULL_RANGE)
            g_gan = dmd2.gan_g_loss(self.logits(dmd2.add_noise(x0, self.randn(tuple(x0.shape)), tg, self.alphas),
                                                tg, cond))
            self.log("train/g_gan_loss", g_gan.detach(), on_step=True, on_epoch=False)
            loss = loss + self.gen_gan_weight * g_gan
        return loss

    def guidance_loss(self, x0: torch.Tensor, cond: dict[str, Any], real: torch.Tensor | None,
                      real_cond: dict[str, Any] | None) -> torch.Tensor:
        n = x0.shape[0]
        t = self.timesteps_in(n, dmd2.FULL_RANGE)
        noise = self.randn(tuple(x0.shape))
        eps = unet_eps(self.guidance["fake_score"], dmd2.add_noise(x0, noise, t, self.alphas), t, cond)
        loss = torch.mean((eps - noise) ** 2)
        self.log("train/fake_score_loss", loss.detach(), on_step=True, on_epoch=False)
        if self.latent_gan:
            if real is None or real_cond is None:
                raise KeyError("DMD2Module: latent_gan needs real latents and captions in batch['real']")
            tr = self.timesteps_in(real.shape[0], dmd2.FULL_RANGE)
            tf = self.timesteps_in(n, dmd2.FULL_RANGE)
            l_real = self.logits(dmd2.add_noise(real, self.randn(tuple(real.shape)), tr, self.alphas), tr, real_cond)
            l_fake = self.logits(dmd2.add_noise(x0, self.randn(tuple(x0.shape)), tf, self.alphas), tf, cond)
            d = dmd2.gan_d_loss(l_real, l_fake)
            self.log("train/d_gan_loss", d.detach(), on_step=True, on_epoch=False)
            loss = loss + self.disc_gan_weight * d
        return loss

    def backsim_depth(self) -> int:
        """k for this iteration: the same on every rank (``iteration_generator``), 0 without backward simulation
        when only one step exists."""
        return dmd2.backsim_index(len(self.timesteps), self.iteration_generator(salt=1))

    def train_iteration(self, batch: dict[str, Any], batch_idx: int) -> None:
        prompts = list(batch["prompts"]["prompt"])
        cond, uncond = self.condition(prompts)
        real_batch = batch.get("real")
        real = self.real_latents(real_batch) if real_batch is not None else None
        real_cond = self.condition(list(real_batch["caption"]))[0] if real_batch and "caption" in real_batch else None
        k = self.last_backsim = self.backsim_depth()
        x_t, t = self.generator_input(len(prompts), k, cond, real)
        g_turn = self.is_turn("generator")
        with torch.set_grad_enabled(g_turn):  # computed once, before the first update (accumulation, manual.py)
            x0 = self.generator_x0(x_t, t, cond)
        self.log("train/backsim_k", float(k), on_step=True, on_epoch=False)
        if g_turn:
            self.update("generator", lambda: self.generator_loss(x0, cond, uncond))
        self.update("guidance", lambda: self.guidance_loss(x0.detach(), cond, real, real_cond))

    # ---------------------------------------------------------------------------------------------- evaluation
    def eval_generator(self, tag: str, batch_idx: int = 0) -> torch.Generator:
        """Per-rank evaluation noise that never draws from the training stream."""
        rank = self.global_rank if self._trainer is not None else 0
        return torch.Generator(device=self.device).manual_seed(derive_seed(global_seed(), tag, rank, batch_idx))

    @torch.no_grad()
    def sample(self, prompts: list[str], gen: torch.Generator | None = None) -> torch.Tensor:
        """Few-step latents (N, C, s, s) for ``prompts`` (no CFG)."""
        cond, _ = self.condition(list(prompts))
        gen = gen or self.eval_generator("sample")
        noise = self.randn((len(prompts), self.channels, self.latent_size, self.latent_size), gen)
        return dmd2.few_step_sample(lambda x, t: self.generator_eps(x, t, cond), noise, self.timesteps, self.alphas,
                                    gen)

    def model_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        """Evaluation: the DM surrogate (how far the fake and the real score disagree on generator samples) and the
        fake score's ε-MSE on them, from evaluation noise."""
        prompts = list((batch.get("prompts") or batch)["prompt"])
        gen = self.eval_generator(stage)
        x0 = self.sample(prompts, gen)
        cond, uncond = self.condition(prompts)
        n = x0.shape[0]
        t = self.timesteps_in(n, dmd2.DM_RANGE, gen)
        noise = self.randn(tuple(x0.shape), gen)
        x_t = dmd2.add_noise(x0, noise, t, self.alphas)
        eps_fake = unet_eps(self.guidance["fake_score"], x_t, t, cond)
        grad = dmd2.dm_gradient(x0, dmd2.eps_to_x0(x_t, eps_fake, t, self.alphas),
                                dmd2.eps_to_x0(x_t, self.real_eps(x_t, t, cond, uncond), t, self.alphas))
        return {"loss": dmd2.dm_loss(x0, grad), "fake_score_loss": torch.mean((eps_fake - noise) ** 2)}

    def _sized(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Prompt-only batches hold no tensor: add the prompt count as one so the eval logs know the batch size."""
        prompts = (batch.get("prompts") or batch)["prompt"]
        return {**batch, "n_prompts": torch.ones(len(prompts))}

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return super().validation_step(self._sized(batch), batch_idx, dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return super().test_step(self._sized(batch), batch_idx, dataloader_idx)

    @torch.no_grad()
    def sample_images(self, batch: dict[str, Any], n: int) -> dict[str, torch.Tensor]:
        prompts = list((batch.get("prompts") or batch)["prompt"])[:n]
        lat = self.sample(prompts)
        if self.vae is not None:
            img = self.vae.decode(lat / self.vae.config.scaling_factor).sample
            return {"samples": img.float().add(1).div(2).clamp(0, 1)}
        x = lat[:, :3]
        lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        return {"latents": (x - lo) / (hi - lo).clamp_min(1e-6)}
