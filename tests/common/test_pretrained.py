"""Frozen pretrained bases from local directories (common/pretrained.py): tiny diffusers/transformers models written
with save_pretrained into tmp dirs and loaded back; wrong paths fail with the directory, the missing file and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctrlgen.lightning_modules.common.pretrained import (
    kind_of,
    load_frozen,
    resolve_class,
    resolve_dtype,
)
from tests.helpers.tiny_lora_module import unet_inputs, write_tiny_pipeline


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"))


def _frozen(m: nn.Module) -> bool:
    return not m.training and not any(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("cls,sub", [("UNet2DConditionModel", "unet"), ("transformers.CLIPTextModel", "text_encoder"),
                                     ("StableDiffusionPipeline", None)])
def test_hub_id_fails_as_missing_dir_without_network(monkeypatch, cls, sub):
    """A hub id is only a missing local directory: no DNS look-up, no connection, even with the hub's offline switch
    off (the harness sets HF_HUB_OFFLINE=1; the guarantee must not rest on it)."""
    import socket

    import huggingface_hub.constants as hub_constants

    calls = []

    def no_net(name):
        def deny(*args, **kwargs):
            calls.append((name, args[1:2] if name == "connect" else args[:1]))
            raise OSError(f"test: network access attempted ({name})")
        return deny

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_net("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", no_net("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", no_net("connect"))
    with pytest.raises(FileNotFoundError, match=r"stabilityai/stable-diffusion-xl-base-1\.0.* not found"):
        load_frozen(cls, "stabilityai/stable-diffusion-xl-base-1.0", subfolder=sub)
    assert calls == []


def test_diffusers_components_load_frozen_with_dtype(pipe_dir):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    ref = UNet2DConditionModel.from_pretrained(str(pipe_dir / "unet"), local_files_only=True)
    unet = load_frozen("UNet2DConditionModel", pipe_dir, subfolder="unet")
    assert isinstance(unet, UNet2DConditionModel) and _frozen(unet)
    x, t, ctx = unet_inputs(2)
    with torch.no_grad():
        assert torch.equal(unet(x, t, encoder_hidden_states=ctx).sample, ref(x, t, encoder_hidden_states=ctx).sample)
    half = load_frozen(UNet2DConditionModel, pipe_dir / "unet", dtype="fp16", device="cpu")
    assert {p.dtype for p in half.parameters()} == {torch.float16} and _frozen(half)
    assert torch.equal(half.conv_in.weight, ref.conv_in.weight.half())

    vae = load_frozen("diffusers.AutoencoderKL", pipe_dir / "vae", dtype=torch.bfloat16)
    assert isinstance(vae, AutoencoderKL) and _frozen(vae) and vae.dtype == torch.bfloat16
    sched = load_frozen("DDPMScheduler", pipe_dir, subfolder="scheduler")
    assert isinstance(sched, DDPMScheduler) and sched.config.steps_offset == 1


def test_transformers_model_and_tokenizer(pipe_dir):
    from transformers import CLIPTextModel

    te = load_frozen("transformers.CLIPTextModel", pipe_dir / "text_encoder")
    assert isinstance(te, CLIPTextModel) and _frozen(te)
    tok = load_frozen("transformers.AutoTokenizer", pipe_dir / "tokenizer")
    ids = tok("a cat", padding="max_length", max_length=8, return_tensors="pt").input_ids
    assert ids.shape == (1, 8) and ids[0, 0].item() == 0  # <|startoftext|>
    with torch.no_grad():
        assert te(ids).last_hidden_state.shape == (1, 8, 16)


def test_whole_pipeline_loads_frozen_and_runs(pipe_dir):
    pipe = load_frozen("DiffusionPipeline", pipe_dir, dtype="fp32")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    mods = [c for c in pipe.components.values() if isinstance(c, nn.Module)]
    assert len(mods) == 3 and all(_frozen(m) for m in mods)
    img = pipe(prompt="a cat", num_inference_steps=2, height=16, width=16, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()


def test_missing_dir_names_dir_and_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        load_frozen("UNet2DConditionModel", missing)
    msg = str(e.value)
    assert str(missing) in msg and "not found" in msg and "save_pretrained" in msg and "nothing is downloaded" in msg
    assert "UNet2DConditionModel" in msg
    with pytest.raises(FileNotFoundError, match="not found"):  # a hub id is a missing local dir, never a download
        load_frozen("UNet2DConditionModel", "stabilityai/stable-diffusion-xl-base-1.0", subfolder="unet")


@pytest.mark.parametrize("cls,sub,marker", [("UNet2DConditionModel", "unet", "config.json"),
                                            ("DDPMScheduler", "scheduler", "scheduler_config.json"),
                                            ("transformers.CLIPTokenizer", "tokenizer", "tokenizer_config.json"),
                                            ("StableDiffusionPipeline", "", "model_index.json")])
def test_dir_without_marker_names_the_missing_file(tmp_path, cls, sub, marker):
    d = tmp_path / "empty" / sub
    d.mkdir(parents=True)
    (d / "something.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as e:
        load_frozen(cls, tmp_path / "empty", subfolder=sub or None, what="base model", example="the SDXL base")
    msg = str(e.value)
    assert f"has no {marker}" in msg and str(d) in msg and "the SDXL base" in msg and "base model" in msg


def test_env_variable_path(pipe_dir, monkeypatch):
    monkeypatch.delenv("CTRLGEN_TEST_UNET", raising=False)
    with pytest.raises(FileNotFoundError, match="CTRLGEN_TEST_UNET is not set"):
        load_frozen("UNet2DConditionModel", None, env="CTRLGEN_TEST_UNET")
    monkeypatch.setenv("CTRLGEN_TEST_UNET", str(pipe_dir))
    assert _frozen(load_frozen("UNet2DConditionModel", None, subfolder="unet", env="CTRLGEN_TEST_UNET"))


def test_resolvers():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(None) is None
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8")
    with pytest.raises(ValueError, match="full import path"):
        resolve_class("NoSuchModel")
    assert kind_of(resolve_class("transformers.AutoTokenizer")) == "tokenizer"
    assert kind_of(resolve_class("EulerDiscreteScheduler")) == "scheduler"
    assert kind_of(resolve_class("StableDiffusionXLPipeline")) == "pipeline"
    assert kind_of(resolve_class("transformers.CLIPTextModelWithProjection")) == "model"
