"""LPIPS with a local backbone file (TORCH_HOME layout), torchvision-free."""

from __future__ import annotations

import importlib.util

import re

import pytest
import torch

from ctrlgen.lightning_modules.metrics.perceptual import (
    LPIPS,
    LPIPS_BACKBONE_FILES,
    LPIPSNet,
    lpips_from_local,
    resolve_lpips_backbone,
)


HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def _squeezenet1_1_manifest() -> dict[str, tuple[int, ...]]:
    """torchvision squeezenet1_1 state-dict keys and shapes, written out by hand (features + classifier)."""
    m = {"features.0.weight": (64, 3, 3, 3), "features.0.bias": (64,)}
    fires = {3: (64, 16, 64), 4: (128, 16, 64), 6: (128, 32, 128), 7: (256, 32, 128),
             9: (256, 48, 192), 10: (384, 48, 192), 11: (384, 64, 256), 12: (512, 64, 256)}
    for i, (cin, sq, ex) in fires.items():
        m[f"features.{i}.squeeze.weight"] = (sq, cin, 1, 1)
        m[f"features.{i}.squeeze.bias"] = (sq,)
        m[f"features.{i}.expand1x1.weight"] = (ex, sq, 1, 1)
        m[f"features.{i}.expand1x1.bias"] = (ex,)
        m[f"features.{i}.expand3x3.weight"] = (ex, sq, 3, 3)
        m[f"features.{i}.expand3x3.bias"] = (ex,)
    m["classifier.1.weight"] = (1000, 512, 1, 1)
    m["classifier.1.bias"] = (1000,)
    return m


def _random_state_dict(manifest: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in manifest.items():
        if k.endswith("weight"):
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            sd[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.01
    return sd


@pytest.fixture
def squeeze_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    ck = home / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    sd = _random_state_dict(_squeezenet1_1_manifest())
    torch.save(sd, ck / LPIPS_BACKBONE_FILES["squeeze"])
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv("LPIPS_TORCH_HOME", raising=False)
    return home, sd


def _imgs(seed: int, n: int = 2, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    # some structure so the flip is not just noise-vs-noise
    x[:, :, :, : size // 3] *= 0.3
    return x


def test_lpips_squeeze_from_torch_home_identity_zero_flip_positive(squeeze_home):
    _, sd = squeeze_home
    metric = lpips_from_local("squeeze", normalize=True, reduction="none")
    assert isinstance(metric, LPIPS)
    # the backbone really is the file's weights
    assert torch.equal(metric.net.features[0].weight, sd["features.0.weight"])
    assert torch.equal(metric.net.features[12].expand3x3.weight, sd["features.12.expand3x3.weight"])
    x = _imgs(0)
    metric.update(x, x)
    assert torch.all(metric.compute() == 0)
    metric.reset()
    metric.update(x, x.flip(-1))
    d = metric.compute()
    assert d.shape == (2,) and torch.all(d > 1e-3)
    # [-1,1] inputs without normalize give the same distances
    m2 = lpips_from_local("squeezenet1_1", normalize=False)
    m2.update(2 * x - 1, 2 * x.flip(-1) - 1)
    assert m2.compute().item() == pytest.approx(d.mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        m2.update(x * 3, x)


def test_lpips_formula_matches_torchmetrics_lpips_forward(squeeze_home):
    """Cross-check our LPIPS math against torchmetrics' own _LPIPS.forward, with our backbone slices plugged in."""
    from torchmetrics.functional.image.lpips import _LPIPS, ScalingLayer

    net = LPIPSNet("squeeze", squeeze_home[1])

    class Taps(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def forward(self, x):
            return self.n._taps(x)

    ref = _LPIPS.__new__(_LPIPS)
    torch.nn.Module.__init__(ref)
    ref.scaling_layer, ref.net, ref.lins = ScalingLayer(), Taps(net), net.lins
    ref.L, ref.spatial, ref.resize = len(net.lins), False, None
    ref.eval()
    a, b = _imgs(1), _imgs(2)
    with torch.no_grad():
        ours = net(2 * a - 1, 2 * b - 1)
        theirs = ref(2 * a - 1, 2 * b - 1).view(-1)
    assert ours.shape == (2,) and torch.all(ours > 0)
    # torchmetrics normalises with eps 1e-8 inside the sqrt as we do; heads are its shipped squeeze.pth
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_lpips_backbone_resolution_and_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.delenv("LPIPS_TORCH_HOME", raising=False)
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth") as ei:
        lpips_from_local("alex")
    assert "LPIPS_TORCH_HOME" in str(ei.value)
    # flat folder via LPIPS_TORCH_HOME, or an explicit file path
    flat = tmp_path / "weights"
    flat.mkdir()
    f = flat / LPIPS_BACKBONE_FILES["squeeze"]
    torch.save(_random_state_dict(_squeezenet1_1_manifest()), f)
    monkeypatch.setenv("LPIPS_TORCH_HOME", str(flat))
    assert resolve_lpips_backbone("squeeze") == f
    assert resolve_lpips_backbone("squeeze", f) == f
    with pytest.raises(ValueError, match="net_type"):
        resolve_lpips_backbone("resnet")
    # a state dict of the wrong architecture is rejected, naming the file and what does not fit
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(RuntimeError, match=rf"in {re.escape(str(bad))} does not match torchvision's squeeze features: "
                       r"missing \['features.0.bias', .*mis-shaped \['features.0.weight: expected \(64, 3, 3, 3\), "
                       r"found \(1,\)'\]"):
        lpips_from_local("squeeze", bad)
    sd = _random_state_dict(_squeezenet1_1_manifest())
    sd["features.99.weight"] = torch.zeros(1)
    torch.save(sd, bad)
    with pytest.raises(RuntimeError, match=r"missing \[\], unexpected \['features.99.weight'\], mis-shaped \[\]"):
        lpips_from_local("squeeze", bad)


@pytest.mark.skipif(HAS_TORCHVISION, reason="checks the no-torchvision error path")
def test_torchmetrics_backend_needs_torchvision(squeeze_home):
    with pytest.raises(ModuleNotFoundError, match="torchvision"):
        lpips_from_local("squeeze", backend="torchmetrics")


# torchvision is not a dependency: PyPI's torchvision 0.28 (the build for torch 2.13) does not load with the CPU torch
# wheel of this machine ("operator torchvision::nms does not exist", checked 2026-11-26); runs where torchvision works
@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed in this venv (native backend only)")
def test_torchmetrics_backend_via_torch_home_trick_agrees_with_native(squeeze_home):  # pragma: no cover
    x = _imgs(3)
    tm = lpips_from_local("squeeze", normalize=True, backend="torchmetrics")
    nat = lpips_from_local("squeeze", normalize=True)
    tm.update(x, x.flip(-1))
    nat.update(x, x.flip(-1))
    assert tm.compute().item() == pytest.approx(nat.compute().item(), rel=1e-4)


def test_alex_and_vgg_backbones_have_torchvision_feature_layout():
    from ctrlgen.lightning_modules.metrics.perceptual import build_lpips_backbone

    alex = {f"features.{k}": tuple(v.shape) for k, v in build_lpips_backbone("alex").state_dict().items()}
    assert alex == {"features.0.weight": (64, 3, 11, 11), "features.0.bias": (64,),
                    "features.3.weight": (192, 64, 5, 5), "features.3.bias": (192,),
                    "features.6.weight": (384, 192, 3, 3), "features.6.bias": (384,),
                    "features.8.weight": (256, 384, 3, 3), "features.8.bias": (256,),
                    "features.10.weight": (256, 256, 3, 3), "features.10.bias": (256,)}
    vgg = {f"features.{k}": v for k, v in build_lpips_backbone("vgg").state_dict().items()}
    convs = sorted(int(k.split(".")[1]) for k in vgg if k.endswith("weight"))
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert tuple(vgg["features.28.weight"].shape) == (512, 512, 3, 3)
