"""configs/defocus/dmd2_{tiny,sd15,sdxl}.yaml instantiate (run=False); the real-weight recipes get a tiny saved
SD1.5 / SDXL pipeline directory (random UNet, CLIP text encoders, word-level tokenizers, VAE, DDPM scheduler) through
``model.init_args.pretrained``, and the loaded module conditions and samples on CPU. configs/strategy/dmd2_*.yaml stack."""

from __future__ import annotations

import pytest
import torch
from ctrlgen.lightning_modules.cli import CtrlgenCLI

from tests.defocus.test_dmd2_module import WORDS, write_dmd2_shards


def _tokenizer(path, max_len: int = 8):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                            model_max_length=max_len).save_pretrained(path)


def save_tiny_pipeline(root, sdxl: bool) -> str:
    """A diffusers-layout directory with tiny random components (latent 4 x 8 x 8, VAE factor 2)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    te = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "vocab_size": 16, "max_position_embeddings": 8, "projection_dim": 16}
    CLIPTextModel(CLIPTextConfig(**te)).save_pretrained(root / "text_encoder")
    _tokenizer(root / "tokenizer")
    unet = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
            "block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 4, "norm_num_groups": 8,
            "cross_attention_dim": 16}
    if sdxl:
        CLIPTextModelWithProjection(CLIPTextConfig(**te)).save_pretrained(root / "text_encoder_2")
        _tokenizer(root / "tokenizer_2")
        unet.update(cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=4,
                    projection_class_embeddings_input_dim=6 * 4 + 16)
    UNet2DConditionModel(**unet).save_pretrained(root / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                  norm_num_groups=4, sample_size=16).save_pretrained(root / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(root / "scheduler")
    return str(root)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_dmd2_shards(tmp_path_factory.mktemp("dmd2_cfg_shards"))


def _cli(config, shards, monkeypatch, tmp_path, *extra):
    for k, v in shards.items():
        monkeypatch.setenv(k, v)
    return CtrlgenCLI(args=["-c", config, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                            "--trainer.callbacks=[]", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
                            *extra], run=False)


@pytest.mark.parametrize("name,sdxl", [("sd15", False), ("sdxl", True)])
def test_real_weight_recipes_instantiate_on_a_tiny_saved_pipeline(name, sdxl, shards, monkeypatch, tmp_path):
    root = save_tiny_pipeline(tmp_path / "pipe", sdxl)
    cli = _cli(f"configs/defocus/dmd2_{name}.yaml", shards, monkeypatch, tmp_path / "run",
               f"--model.init_args.pretrained={root}")
    m = cli.model
    assert m.sdxl is sdxl and m.vae is not None and m.timesteps == [999, 749, 499, 249]
    assert m.teacher.dtype == torch.bfloat16 and m.generator.dtype == torch.float32
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert all(p.requires_grad for p in m.generator.parameters())
    assert m.frozen_bases()["teacher"]["path"].endswith("unet")  # provenance of the frozen teacher
    assert m.update_every == {"generator": 10 if name == "sd15" else 5}
    cond, uncond = m.condition(["red cat", "blue dog"])
    assert cond["encoder_hidden_states"].shape == (2, 8, 32 if sdxl else 16)
    if sdxl:
        assert cond["added_cond_kwargs"]["time_ids"][0].tolist() == [16, 16, 0, 0, 16, 16]  # latent 8 x VAE factor 2
        assert torch.count_nonzero(uncond["encoder_hidden_states"]) == 0
    m.teacher.float()  # bf16 convolutions on CPU are slow but work; fp32 keeps the test quick
    imgs = m.sample_images({"prompts": {"prompt": ["red cat"]}}, 1)["samples"]
    assert imgs.shape == (1, 3, 16, 16) and 0 <= imgs.min() and imgs.max() <= 1


def test_tiny_recipe_and_dmd2_strategies_stack(shards, monkeypatch, tmp_path):
    cli = _cli("configs/defocus/dmd2_tiny.yaml", shards, monkeypatch, tmp_path, "-c", "configs/strategy/dmd2_ddp.yaml")
    assert cli.trainer.strategy._ddp_kwargs["find_unused_parameters"] is True
    assert sum(p.numel() for p in cli.model.parameters() if p.requires_grad) > 0


def test_fsdp_strategy_config_names_model_parallel():
    import yaml

    with open("configs/strategy/dmd2_fsdp.yaml") as f:
        cfg = yaml.safe_load(f)
    assert cfg["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
