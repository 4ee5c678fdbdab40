"""CLIP score on a tiny random local CLIP (transformers 5 adapter for torchmetrics CLIPScore, platform.md §5)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from ctrlgen.lightning_modules.metrics.clip import (
    CLIPFeatureWrapper,
    clip_features,
    clip_score_from_features,
    clip_score_metric,
    load_local_clip,
)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """Tiny random CLIP (towers of hidden 32, 2 layers, 2 heads, vision 32² patch 8, projection 16) + a ~60-entry
    byte-level BPE vocab/merges written here + a CLIP image processor at 32²."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny_clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(letters)})
    for tok in ("ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[tok] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(d)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "vocab_size": len(vocab), "max_position_embeddings": 32, "bos_token_id": bos,
                     "eos_token_id": eos, "pad_token_id": eos},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(d)
    return d


def test_score_from_features_closed_forms():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    s = clip_score_from_features(a, b)
    assert s.tolist() == pytest.approx([100.0, 0.0, 0.0])
    assert clip_score_from_features(a, b, clamp=False)[2].item() == pytest.approx(-100.0)
    with pytest.raises(ValueError, match="shapes differ"):
        clip_score_from_features(a, b[:2])


def test_wrapper_returns_plain_feature_tensors(tiny_clip_dir):
    wrapper, processor = load_local_clip(tiny_clip_dir)
    assert isinstance(wrapper, CLIPFeatureWrapper) and wrapper.config.projection_dim == 16
    imgs = torch.randint(0, 256, (3, 3, 40, 36), dtype=torch.uint8)
    feats = clip_features(wrapper, processor, images=imgs, texts=["a cat", "cat", "bag"])
    assert isinstance(feats["image"], torch.Tensor) and feats["image"].shape == (3, 16)
    assert isinstance(feats["text"], torch.Tensor) and feats["text"].shape == (3, 16)
    # the raw transformers-5 output is a ModelOutput whose pooler_output the wrapper returns
    px = processor(images=[i for i in imgs], return_tensors="pt")["pixel_values"]
    raw = wrapper.model.get_image_features(pixel_values=px)
    assert not isinstance(raw, torch.Tensor)
    assert torch.allclose(raw.pooler_output, feats["image"], atol=1e-6)
    # different captions give different text embeddings
    assert not torch.allclose(feats["text"][0], feats["text"][2])


def test_torchmetrics_clip_score_with_local_dir(tiny_clip_dir):
    imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    caps = ["a cat", "cat", "bag", "a big cat"]
    metric = clip_score_metric(tiny_clip_dir)
    metric.update(imgs, caps)
    got = metric.compute()
    wrapper, processor = load_local_clip(tiny_clip_dir)
    f = clip_features(wrapper, processor, images=imgs, texts=caps)
    expected = clip_score_from_features(f["image"], f["text"], clamp=False).mean().clamp_min(0)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(expected.item(), abs=1e-3)


def test_missing_clip_dir_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("CLIP_MODEL_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="CLIP_MODEL_DIR"):
        load_local_clip()
    with pytest.raises(FileNotFoundError, match="no_clip_here"):
        clip_score_metric(tmp_path / "no_clip_here")
