"""Reference statistics from image folders / WebDataset shards / ADM npz, saved and reused for FID and P-R."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ctrlgen.lightning_modules.metrics.distribution import GenerativeMetrics
from ctrlgen.lightning_modules.metrics.refstats import (
    FIDFromStats,
    RefStats,
    compute_refstats,
    iter_images,
    load_refstats,
    refstats_cli,
)


class TinyExtractor(nn.Module):
    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(16, generator=g) * 0.1)

    def forward(self, x):
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return torch.tanh(self.conv(x)).mean((2, 3))


def _arrays(n: int, seed: int = 0, size: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))
    noise = rng.integers(-40, 40, (n, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _direct_stats(arrs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with torch.no_grad():
        f = TinyExtractor()(torch.from_numpy(arrs).permute(0, 3, 1, 2)).double().numpy()
    return f.mean(0), np.cov(f, rowvar=False), f


def test_folder_source_stats_roundtrip_and_fid_from_stats(tmp_path):
    arrs = _arrays(10)
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for i, a in enumerate(arrs):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    stats = compute_refstats(tmp_path / "imgs", TinyExtractor(), batch_size=4, progress=False)
    mu, sigma, feats = _direct_stats(arrs)
    assert stats.num_samples == 10
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(stats.features, feats, rtol=1e-5, atol=1e-6)
    path = stats.save(tmp_path / "ref.npz")
    back = load_refstats(path)
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert back.num_samples == 10 and back.meta["num_features"] == 16
    # the same images against their own stats: FID ~ 0, P = R = 1
    m = FIDFromStats(path, TinyExtractor())
    m.update(torch.from_numpy(arrs).permute(0, 3, 1, 2))
    out = m.compute()
    assert abs(out["fid"].item()) < 1e-4
    assert out["precision"].item() == 1.0 and out["recall"].item() == 1.0
    # other images: same FID as computing both sides live
    other = torch.from_numpy(_arrays(10, seed=5)).permute(0, 3, 1, 2)
    m.reset()
    m.update(other)
    live = GenerativeMetrics(TinyExtractor())
    live.update(torch.from_numpy(arrs).permute(0, 3, 1, 2), real=True)
    live.update(other, real=False)
    a, b = m.compute(), live.compute()
    assert a["fid"].item() > 1e-3
    assert a["fid"].item() == pytest.approx(b["fid"].item(), rel=1e-4)
    assert a["recall"].item() == b["recall"].item()
    with pytest.raises(RuntimeError, match="real=False"):
        m.update(other, real=True)


def test_webdataset_shards_brace_pattern_and_cli(tmp_path, capsys):
    import webdataset as wds

    arrs = _arrays(12, seed=1)
    for s in range(3):
        with wds.TarWriter(str(tmp_path / f"val-{s:06d}.tar")) as w:
            for i in range(4):
                k = s * 4 + i
                w.write({"__key__": f"s{k:06d}", "png": _png(arrs[k]), "cls": k % 3})
    pattern = str(tmp_path / "val-{000000..000002}.tar")
    imgs = list(iter_images(pattern))
    assert len(imgs) == 12 and imgs[0].shape == (3, 24, 24) and imgs[0].dtype == torch.uint8
    np.testing.assert_array_equal(imgs[7].permute(1, 2, 0).numpy(), arrs[7])  # PNG is lossless, order kept
    out = refstats_cli(pattern, tmp_path / "stats" / "val.npz", inception=TinyExtractor(), batch_size=5)
    assert "12 images" in capsys.readouterr().out
    st = load_refstats(out)
    mu, sigma, _ = _direct_stats(arrs)
    np.testing.assert_allclose(st.mu, mu, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(st.sigma, sigma, rtol=1e-4, atol=1e-8)
    # glob pattern, explicit key, max_images, no features -> FIDFromStats skips P/R
    st2 = compute_refstats(str(tmp_path / "val-*.tar"), TinyExtractor(), image_key="png", save_features=False,
                           max_images=8, progress=False)
    assert st2.num_samples == 8 and st2.features is None
    st2.save(tmp_path / "nofeat.npz")
    m = FIDFromStats(tmp_path / "nofeat.npz", TinyExtractor())
    assert m.compute_pr is False
    with pytest.raises(KeyError, match="jpg"):
        next(iter_images(pattern, image_key="jpg"))


def test_adm_npz_source_and_missing_inputs(tmp_path, monkeypatch):
    arrs = _arrays(6, seed=2)
    np.savez(tmp_path / "ref_batch.npz", arr_0=arrs)
    st = compute_refstats(str(tmp_path / "ref_batch.npz"), TinyExtractor(), batch_size=4, progress=False)
    mu, _, _ = _direct_stats(arrs)
    np.testing.assert_allclose(st.mu, mu, rtol=1e-5, atol=1e-7)
    # ADM-style stats file (mu/sigma only) loads for FID
    np.savez(tmp_path / "adm.npz", mu=st.mu, sigma=st.sigma, arr_0=arrs)
    adm = load_refstats(tmp_path / "adm.npz")
    assert isinstance(adm, RefStats) and adm.features is None
    with pytest.raises(FileNotFoundError, match="refstats"):
        load_refstats(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="no WebDataset shards"):
        compute_refstats(str(tmp_path / "nothing-*.tar"), TinyExtractor(), progress=False)
    # default extractor = local Inception: offline without weights -> clear error
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(FileNotFoundError, match="FID_INCEPTION_WEIGHTS"):
        refstats_cli(str(tmp_path / "ref_batch.npz"), tmp_path / "x.npz")
