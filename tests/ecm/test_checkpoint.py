"""Strict loading of (fake) official checkpoints (spec §3.1, §3.9; §8 checks 1 and 3)."""
import hashlib
import os
import re
from pathlib import Path

import pytest
import torch

from ctrlgen.lightning_modules.ecm.checkpoint import (
    fake_state_dict,
    find_fixtures_dir,
    load_state_dict_strict,
    read_manifest,
    sha256_of,
)
from ctrlgen.lightning_modules.ecm.control import CONTROL_PRESETS, ECMControlNet
from ctrlgen.lightning_modules.ecm.scales import block_causal_bias, lvl_index
from ctrlgen.lightning_modules.ecm.var import VAR, build_var
from ctrlgen.lightning_modules.ecm.vqvae import VQVAE

MANIFESTS = Path(__file__).resolve().parents[1] / "fixtures"  # vendored copies of shared/fixtures/*.tsv
FIX = find_fixtures_dir()  # where the (large, not vendored) official weights may live


def _empty(cls, **kw):
    """Full-size model without paying for random init (meta → uninitialised CPU storage)."""
    with torch.device("meta"):
        m = cls(**kw)
    return m.to_empty(device="cpu")


def test_fake_var_d16_checkpoint_loads_strict(tmp_path):
    man = read_manifest(MANIFESTS / "var_d16_state_dict.tsv")
    bufs = {"lvl_1L": lvl_index().view(1, -1), "attn_bias_for_masking": block_causal_bias()}
    path = tmp_path / "var_d16.pth"
    torch.save(fake_state_dict(man, bufs, fill=0.0), path)
    model = _empty(VAR, depth=16)
    report = load_state_dict_strict(model, path)
    assert report["num_tensors"] == 220 and report["unwrapped"] == "top level"
    sd = model.state_dict()
    assert list(sd) == [k for k, _, _ in man]
    assert torch.all(model.head.weight == 0) and torch.equal(model.attn_bias_for_masking, bufs["attn_bias_for_masking"])
    assert model.lvl_1L.dtype == torch.int64
    os.remove(path)


def test_fake_vqvae_checkpoint_loads_strict_safetensors(tmp_path):
    from safetensors.torch import save_file

    man = read_manifest(MANIFESTS / "vae_ch160v4096z32_state_dict.tsv")
    path = tmp_path / "vae.safetensors"
    save_file(fake_state_dict(man, fill=0.5), str(path))
    model = _empty(VQVAE)
    assert load_state_dict_strict(model, path)["num_tensors"] == 324
    assert torch.all(model.quantize.embedding.weight == 0.5)
    assert set(model.state_dict()) == {k for k, _, _ in man}


@pytest.mark.skipif(FIX is None, reason="no shared/fixtures here to compare the vendored manifests with")
def test_vendored_manifests_match_shared():
    for name in ("var_d16_state_dict.tsv", "vae_ch160v4096z32_state_dict.tsv"):
        if (FIX / name).is_file():
            assert (MANIFESTS / name).read_bytes() == (FIX / name).read_bytes(), f"tests/fixtures/{name} is stale"


@pytest.fixture()
def tiny_var():
    torch.manual_seed(0)
    return build_var("tiny", depth=2, embed_dim=64, num_heads=1)


def test_mismatch_lists_keys_and_shapes(tiny_var, tmp_path):
    sd = {k: v.clone() for k, v in tiny_var.state_dict().items()}
    del sd["head.bias"]
    sd["extra.weight"] = torch.zeros(3)
    sd["word_embed.weight"] = torch.zeros(64, 32)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError) as e:
        load_state_dict_strict(tiny_var, path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing keys (1)" in msg and "head.bias" in msg
    assert "unexpected keys (1)" in msg and "extra.weight" in msg
    assert "word_embed.weight: expected (64, 16), found (64, 32)" in msg


def test_corrupt_mask_is_rejected(tiny_var, tmp_path):
    sd = {k: v.clone() for k, v in tiny_var.state_dict().items()}
    sd["attn_bias_for_masking"].zero_()  # a "bidirectional" mask
    path = tmp_path / "corrupt.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="attn_bias_for_masking"):
        load_state_dict_strict(tiny_var, path)
    sd = {k: v.clone() for k, v in tiny_var.state_dict().items()}
    sd["lvl_1L"] = torch.zeros_like(sd["lvl_1L"])
    torch.save(sd, path)
    with pytest.raises(ValueError, match="lvl_1L"):
        load_state_dict_strict(tiny_var, path)


def test_containers_are_unwrapped(tiny_var, tmp_path):
    src = build_var("tiny", depth=2, embed_dim=64, num_heads=1)
    sd = src.state_dict()
    cases = {
        "lightning.ckpt": ({"state_dict": {f"var.{k}": v for k, v in sd.items()}, "epoch": 3}, "var."),
        "wrapped.pth": ({"model": sd, "args": {"lr": 1.0}}, None),
        "ddp.pth": ({f"module.{k}": v for k, v in sd.items()}, None),
    }
    for name, (obj, prefix) in cases.items():
        torch.save(obj, tmp_path / name)
        with torch.no_grad():
            tiny_var.head.weight.zero_()
        rep = load_state_dict_strict(tiny_var, tmp_path / name, prefix=prefix)
        assert torch.equal(tiny_var.head.weight, src.head.weight), name
        assert rep["unwrapped"] != "top level"


def test_control_net_checkpoint_excludes_base(tmp_path):
    torch.manual_seed(0)
    var = build_var("tiny", depth=2, embed_dim=64, num_heads=1)
    ctl = ECMControlNet(var, **{**CONTROL_PRESETS["tiny"], "every": 1, "offset": 1})
    path = tmp_path / "ecm.pth"
    torch.save(ctl.state_dict(), path)
    other = ECMControlNet(var, **{**CONTROL_PRESETS["tiny"], "every": 1, "offset": 1})
    load_state_dict_strict(other, path)
    assert all(torch.equal(a, b) for a, b in zip(ctl.state_dict().values(), other.state_dict().values()))
    assert not any(k.startswith("blocks.") for k in ctl.state_dict())


def test_sha256_and_missing_file(tmp_path):
    p = tmp_path / "blob.bin"
    p.write_bytes(b"ctrlgen" * 1000)
    assert sha256_of(p) == hashlib.sha256(b"ctrlgen" * 1000).hexdigest()
    missing = re.escape(f"weights file '{tmp_path / 'nope.pth'}' does not exist")
    with pytest.raises(FileNotFoundError, match=rf"^{missing} \(set the config's \*_weights to a local file\)$"):
        load_state_dict_strict(torch.nn.Linear(2, 2), tmp_path / "nope.pth")


def _real(name: str, env: str) -> Path | None:
    p = os.environ.get(env)
    cand = Path(p) if p else (FIX / name if FIX else None)
    return cand if cand is not None and cand.is_file() else None


@pytest.mark.skipif(_real("var_d16.pth", "CTRLGEN_VAR_D16") is None,
                    reason="official var_d16.pth not available locally (set CTRLGEN_VAR_D16)")
def test_real_var_d16_loads():
    report = load_state_dict_strict(_empty(VAR, depth=16), _real("var_d16.pth", "CTRLGEN_VAR_D16"))
    assert report["num_tensors"] == 220, report


@pytest.mark.skipif(_real("vae_ch160v4096z32.pth", "CTRLGEN_VAE") is None,
                    reason="official vae_ch160v4096z32.pth not available locally (set CTRLGEN_VAE)")
def test_real_vqvae_loads():
    report = load_state_dict_strict(_empty(VQVAE), _real("vae_ch160v4096z32.pth", "CTRLGEN_VAE"))
    assert report["num_tensors"] == 324, report
