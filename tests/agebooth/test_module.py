"""AgeLoRAModule: a short LoRA fit through the CLI on real faces shards (tmp_path) changes only the LoRA, the
exported adapter round-trips through diffusers' LoRA loader, both bands start from the same A with B = 0, and the
full (base) mode trains the UNet and exports a directory the LoRA mode loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ctrlgen.lightning_modules.agebooth import world
from ctrlgen.lightning_modules.agebooth.module import AgeLoRAModule

from tests.conftest import REPO

SIZE = 16


def tiny_nets(seed: int = 0):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=12, pad_token_id=0,
                                      bos_token_id=2, eos_token_id=3))
    return unet, te


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny base exported by the full mode (random weights; what the demo's base stage writes)."""
    unet, te = tiny_nets()
    m = AgeLoRAModule(unet=unet, text_encoder=te, train_mode="full", resolution=SIZE, stream="faces",
                      scheduler_config={"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"})
    return m.export(tmp_path_factory.mktemp("agebooth") / "base")


@pytest.fixture(scope="module")
def young_shards(tmp_path_factory) -> str:
    from ctrlgen.datamodules.shards import write_shards

    out = tmp_path_factory.mktemp("faces")
    urls = write_shards(world.samples(0, "train", 16, SIZE, identities=[0], ages=(10, 20)),
                        str(out / "young-%06d.tar"), maxcount=16)
    return urls[0]


def _fit(tmp_path: Path, base: Path, shards: str, adapter: str = "young", steps: int = 3):
    from ctrlgen.lightning_modules.cli import CtrlgenCLI

    return CtrlgenCLI(args=["fit", "-c", str(REPO / "configs/agebooth/demo_lora.yaml"),
                            f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                            "--trainer.callbacks=[]", f"--trainer.max_steps={steps}",
                            f"--trainer.val_check_interval={steps}", "--trainer.enable_progress_bar=false",
                            f"--model.init_args.pretrained={base}", "--model.init_args.unet=null",
                            "--model.init_args.text_encoder=null", f"--model.init_args.adapter={adapter}",
                            "--model.init_args.optimizer.init_args.lr=1e-2",
                            "--data.init_args.streams={faces: {train_shards: " + shards
                            + ", keys: {jpg: image, txt: caption}, random_crop: false}}",
                            "--data.init_args.batch_size=4", f"--data.init_args.train_batches_per_epoch={steps}"])


def test_lora_fit_changes_only_the_lora_and_round_trips(tmp_path, base_dir, young_shards):
    from diffusers import UNet2DConditionModel

    cli = _fit(tmp_path, base_dir, young_shards)
    m = cli.model
    fresh = UNet2DConditionModel.from_pretrained(str(base_dir / "unet"), local_files_only=True)
    base_sd = fresh.state_dict()
    trained = {k.replace(".base_layer", ""): v for k, v in m.unet.state_dict().items() if ".lora_" not in k}
    assert set(trained) == set(base_sd)
    assert all(torch.equal(trained[k], base_sd[k]) for k in base_sd), "a base weight changed"
    ups = [p for n, p in m.unet.named_parameters() if "lora_B" in n]
    assert len(ups) == 32 and all(p.abs().sum() > 0 for p in ups)  # 4 transformer blocks × 2 attn × 4
    opt_params = {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for n, p in m.named_parameters() if ".lora_" in n}
    cli.trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])
    assert set(ckpt["ctrlgen_bases"]) >= {"unet", "text.encoders.0"}
    # the exported adapter loads with diffusers' own LoRA loader and reproduces the trained UNet
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.is_file()
    fresh.load_lora_adapter(str(lora), prefix="unet", adapter_name="young")
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 3, SIZE, SIZE, generator=g), torch.tensor([10, 500]), torch.randn(2, 12, 32, generator=g)
    m.unet.eval()
    with torch.no_grad():
        want, got = m.unet(x, t, ctx).sample, fresh(x, t, ctx).sample
        fresh.disable_lora()
        plain = fresh(x, t, ctx).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (plain - want).abs().max() > 1e-4  # the LoRA does something
    from ctrlgen.lightning_modules.agebooth.adapters import load_age_lora

    factors = load_age_lora(lora)
    assert len(factors) == 32 and all(f.rank == 16 and f.scale == 1.0 for f in factors.values())


def test_bands_share_a_and_start_as_the_base(base_dir):
    young = AgeLoRAModule(pretrained=str(base_dir), adapter="young", stream="faces", resolution=SIZE)
    old = AgeLoRAModule(pretrained=str(base_dir), adapter="old", stream="faces", resolution=SIZE, lora_init_seed=0)
    a_y = {n.replace("young", "X"): p for n, p in young.unet.named_parameters() if "lora_A" in n}
    a_o = {n.replace("old", "X"): p for n, p in old.unet.named_parameters() if "lora_A" in n}
    assert a_y and all(torch.equal(a_y[k], a_o[k]) for k in a_y)
    assert all((p == 0).all() for n, p in young.unet.named_parameters() if "lora_B" in n)
    trainable = [n for n, p in young.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(str(base_dir / "unet"), local_files_only=True).eval()
    x, t, ctx = torch.randn(1, 3, SIZE, SIZE), torch.tensor([100]), torch.randn(1, 12, 32)
    with torch.no_grad():
        assert torch.equal(young.unet.eval()(x, t, ctx).sample, base(x, t, ctx).sample)


def test_defaults_follow_the_paper_recipe(base_dir):
    m = AgeLoRAModule(pretrained=str(base_dir), stream="faces", resolution=SIZE,
                      instance_prompt="a portrait of sbu person, teenage")
    cfg = m.unet.peft_config["age"]
    assert cfg.r == 16 and cfg.lora_alpha == 16 and set(cfg.target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
    emb = m.encode_prompts(["a portrait of sbu person, teenage"] * 3)["prompt_embeds"]
    assert emb.shape == (3, 12, 32) and m._instance is not None  # encoded once, cached
    with pytest.raises(ValueError, match="not both"):
        AgeLoRAModule(pretrained=str(base_dir), unet=tiny_nets()[0])


def test_full_mode_trains_the_unet_and_exports_a_loadable_base(tmp_path, base_dir):
    m = AgeLoRAModule(pretrained=str(base_dir), train_mode="full", stream="faces", resolution=SIZE)
    assert all(p.requires_grad for p in m.unet.parameters())
    assert not any(p.requires_grad for p in m.text.parameters())
    batch = {"faces": {"image": torch.rand(2, 3, SIZE, SIZE) * 2 - 1, "caption": ["a portrait of sbu person, old"] * 2}}
    m.gen = torch.Generator().manual_seed(0)
    loss = m.model_step(batch, "train")["loss"]
    loss.backward()
    assert all(p.grad is not None for p in m.unet.parameters() if p.ndim > 1)
    out = m.export(tmp_path / "base2")
    assert {"unet", "text_encoder", "tokenizer", "scheduler"} <= {p.name for p in out.iterdir()}
    imgs = AgeLoRAModule(pretrained=str(out), stream="faces", resolution=SIZE, sample_steps=3).generate(["a"] * 2)
    assert imgs.shape == (2, 3, SIZE, SIZE) and imgs.abs().max() <= 1
