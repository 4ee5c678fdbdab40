"""FID / IS / KID / improved P-R (platform.md §5): closed forms, independent implementations, offline Inception."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from ctrlgen.lightning_modules.metrics.distribution import (
    GenerativeMetrics,
    fid_metric,
    frechet_distance,
    improved_precision_recall,
    inception_score_from_logits,
    is_metric,
    kid_metric,
)
from ctrlgen.lightning_modules.metrics.inception import (
    INCEPTION_WEIGHTS_FILENAME,
    FIDInceptionV3,
    inception_from_local,
    resolve_inception_weights,
    tf1_bilinear_resize,
)


class TinyExtractor(nn.Module):
    """conv + mean-pool, 16 features; uint8 or float [0,1] images."""

    num_features = 16

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 16, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(16, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return torch.tanh(self.conv(x)).mean((2, 3))


class Passthrough(nn.Module):
    """Returns its input: lets a test feed precomputed features (or logits) as 'images'."""

    def __init__(self, d: int, with_logits: bool = False) -> None:
        super().__init__()
        self.num_features = d
        self.with_logits = with_logits

    def forward(self, x: torch.Tensor):
        if self.with_logits:
            return x, x[:, :5] * 3.0  # (features, logits)
        return x


def _closed_form_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Independent improved P/R: full Euclidean matrices, sorted rows, explicit loops."""

    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def covered(query, ref, ref_r):
        d = np.sqrt(((query[:, None, :] - ref[None, :, :]) ** 2).sum(-1))
        return np.array([any(d[i, j] <= ref_r[j] for j in range(len(ref))) for i in range(len(query))])

    r_r, f_r = radii(real.astype(np.float64)), radii(fake.astype(np.float64))
    return float(covered(fake, real, r_r).mean()), float(covered(real, fake, f_r).mean())


def _images(n: int, seed: int, size: int = 32, lo: int = 0, hi: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_frechet_distance_matches_scipy_closed_form():
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(200, 8))
    f2 = rng.normal(size=(150, 8)) @ rng.normal(size=(8, 8)) * 0.7 + 0.4
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_closed_form_fid(f1, f2), rel=1e-8)
    assert ours > 1.0
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    # torch inputs, and the torchmetrics formula agree too
    from torchmetrics.image.fid import _compute_fid

    tm = _compute_fid(torch.tensor(mu1), torch.tensor(s1), torch.tensor(mu2), torch.tensor(s2)).item()
    assert frechet_distance(torch.tensor(mu1), torch.tensor(s1), mu2, s2) == pytest.approx(tm, rel=1e-6)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu1, s1, mu2[:4], s2[:4, :4])


def test_generative_metrics_fid_on_injected_features_equals_closed_form():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(120, 6)).astype(np.float32)
    fake = (rng.normal(size=(100, 6)) * 1.3 + 0.5).astype(np.float32)
    m = GenerativeMetrics(Passthrough(6))
    for chunk in np.array_split(real, 3):
        m.update(torch.from_numpy(chunk), real=True)
    for chunk in np.array_split(fake, 4):
        m.update(torch.from_numpy(chunk), real=False)
    out = m.compute()
    assert out["fid"].item() == pytest.approx(_closed_form_fid(real.astype(np.float64), fake.astype(np.float64)),
                                              rel=1e-4)
    p, r = _brute_force_pr(real, fake)
    assert out["precision"].item() == pytest.approx(p, abs=1e-6)
    assert out["recall"].item() == pytest.approx(r, abs=1e-6)
    # identical feature sets: FID ~ 0, P = R = 1
    m2 = GenerativeMetrics(Passthrough(6))
    m2.update(torch.from_numpy(real), real=True)
    m2.update(torch.from_numpy(real), real=False)
    o2 = m2.compute()
    assert abs(o2["fid"].item()) < 1e-5 and o2["precision"].item() == 1.0 and o2["recall"].item() == 1.0


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.4, 1.3), (1.5, 0.5)])
def test_precision_recall_agrees_with_independent_brute_force(shift, scale):
    rng = np.random.default_rng(int(shift * 10))
    real = rng.normal(size=(90, 5)).astype(np.float32)
    fake = (rng.normal(size=(70, 5)) * scale + shift).astype(np.float32)
    p, r = improved_precision_recall(real, fake, k=3)
    bp, br = _brute_force_pr(real, fake, k=3)
    assert (p, r) == pytest.approx((bp, br), abs=1e-9)
    # blockwise computation does not change the answer
    assert improved_precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3, batch_size=7) == (p, r)
    if shift >= 1.5:
        assert r < 0.1 < p  # shifted, narrow fake cloud: its small k-NN balls cover almost no real sample


def test_precision_recall_asymmetry():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(200, 4))
    fake = rng.normal(size=(200, 4)) * 0.3  # mode-collapsed: precise but low recall
    p, r = improved_precision_recall(real, fake)
    assert p > 0.9 and r < 0.6


def test_fid_with_tiny_extractor_matches_torchmetrics_and_is_zero_for_identical_sets():
    a, b = _images(32, 0), _images(32, 1, hi=180)
    ours = GenerativeMetrics(TinyExtractor(), compute_pr=True)
    ours.update(a, real=True)
    ours.update(b, real=False)
    tm = fid_metric(TinyExtractor())
    tm.update(a, real=True)
    tm.update(b, real=False)
    got, ref = ours.compute()["fid"].item(), tm.compute().item()
    assert got > 1e-3
    assert got == pytest.approx(ref, rel=1e-3)
    same = GenerativeMetrics(TinyExtractor(), compute_pr=False)
    same.update(a, real=True)
    same.update(a, real=False)
    assert abs(same.compute()["fid"].item()) < 1e-5


def test_generative_metrics_merge_state_and_checkpoint_hygiene():
    a, b = _images(40, 2), _images(40, 3, lo=40)
    full = GenerativeMetrics(TinyExtractor())
    full.update(a, real=True)
    full.update(b, real=False)
    r0, r1 = GenerativeMetrics(TinyExtractor()), GenerativeMetrics(TinyExtractor())
    r0.update(a[:25], real=True)
    r0.update(b[:10], real=False)
    r1.update(a[25:], real=True)
    r1.update(b[10:], real=False)
    r0.merge_state(r1)  # sum states add, cat states concatenate (what DDP sync does)
    o_full, o_merged = full.compute(), r0.compute()
    for k in ("fid", "precision", "recall"):
        assert o_merged[k].item() == pytest.approx(o_full[k].item(), rel=1e-5, abs=1e-7)
    # the extractor is not a submodule: not in state_dict / parameters (stays out of Lightning checkpoints)
    assert not any(k.startswith("feature") for k in full.state_dict())
    assert list(full.parameters()) == []


def test_inception_score_from_logits_closed_forms_and_torchmetrics():
    n = 12
    assert inception_score_from_logits(torch.zeros(n, 10))[0] == pytest.approx(1.0)
    onehot = torch.full((n, n), -1e4)
    onehot[torch.arange(n), torch.arange(n)] = 0
    assert inception_score_from_logits(onehot)[0] == pytest.approx(float(n), rel=1e-6)
    # ADM-style consecutive splits: 12 one-hot rows in splits of 4 -> each split scores 4
    mean, std = inception_score_from_logits(onehot, split_size=4)
    assert mean == pytest.approx(4.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(64, 7, generator=torch.Generator().manual_seed(0)) * 2
    tm = is_metric(Passthrough(7), splits=1)
    tm.update(logits)
    assert inception_score_from_logits(logits, split_size=None)[0] == pytest.approx(tm.compute()[0].item(), rel=1e-5)
    assert inception_score_from_logits(logits, splits=4)[0] == pytest.approx(
        np.mean([inception_score_from_logits(c, split_size=None)[0] for c in logits.chunk(4)]), rel=1e-9)


def test_generative_metrics_is_from_the_same_pass():
    feats = torch.randn(30, 8, generator=torch.Generator().manual_seed(4))
    m = GenerativeMetrics(Passthrough(8, with_logits=True), compute_is=True, is_split_size=None)
    m.update(feats, real=True)
    m.update(feats * 1.1, real=False)
    out = m.compute()
    assert set(out) == {"fid", "precision", "recall", "inception_score", "inception_score_std"}
    assert out["inception_score"].item() == pytest.approx(
        inception_score_from_logits(feats[:, :5] * 1.1 * 3.0, split_size=None)[0], rel=1e-5)


def test_kid_wrapper_with_tiny_extractor():
    kid = kid_metric(TinyExtractor(), subset_size=16, subsets=5)
    kid.update(_images(24, 5), real=True)
    kid.update(_images(24, 6, hi=128), real=False)
    mean, _ = kid.compute()
    assert torch.isfinite(mean) and mean.item() > 0


def test_tf1_bilinear_resize_semantics():
    x = torch.tensor([[[[10.0, 20.0, 30.0, 40.0]]]])
    # downsample 4 -> 2: source coords 0, 2 (no half-pixel offset): picks x[0], x[2]
    assert tf1_bilinear_resize(x, (1, 2)).flatten().tolist() == [10.0, 30.0]
    # upsample 2 -> 4: coords 0, .5, 1, 1.5 -> [a, (a+b)/2, b, b] (right border clamped)
    y = torch.tensor([[[[0.0, 8.0]]]])
    assert tf1_bilinear_resize(y, (1, 4)).flatten().tolist() == [0.0, 4.0, 8.0, 8.0]
    # differs from torch's half-pixel bilinear
    assert not torch.allclose(torch.nn.functional.interpolate(y, size=(1, 4), mode="bilinear", align_corners=False),
                              tf1_bilinear_resize(y, (1, 4)))


def test_inception_missing_weights_fail_offline_with_clear_message(monkeypatch, tmp_path):
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as ei:
        resolve_inception_weights()
    msg = str(ei.value)
    assert INCEPTION_WEIGHTS_FILENAME in msg and "FID_INCEPTION_WEIGHTS" in msg
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in msg
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILENAME):
        GenerativeMetrics()  # default feature = local Inception
    monkeypatch.setenv("FID_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        fid_metric()


def _random_inception_state_dict(seed: int = 0) -> dict:
    with torch.device("meta"):
        net = FIDInceptionV3()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in net.state_dict().items():
        if not v.is_floating_point():
            sd[k] = torch.zeros(v.shape, dtype=v.dtype)
        elif k.endswith(("running_var", "bn.weight")):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        else:
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
    return sd


def test_inception_layout_and_loading_via_torch_home(monkeypatch, tmp_path):
    sd = _random_inception_state_dict()
    # TF-Inception FID layout (torch-fidelity / pytorch-fid key names), 23,850,960 parameters
    assert len(sd) == 566
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    assert sum(v.numel() for k, v in sd.items() if not k.endswith(buffers)) == 23_850_960
    assert tuple(sd["Conv2d_1a_3x3.conv.weight"].shape) == (32, 3, 3, 3)
    assert tuple(sd["Mixed_7c.branch_pool.conv.weight"].shape) == (192, 2048, 1, 1)
    assert tuple(sd["Mixed_6e.branch7x7dbl_5.conv.weight"].shape) == (192, 192, 1, 7)
    assert tuple(sd["fc.weight"].shape) == (1008, 2048)
    home = tmp_path / "th"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")},
               home / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAME)
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(home))
    net = inception_from_local(outputs=("2048", "logits_unbiased", "logits"))
    assert torch.equal(net.fc.weight, sd["fc.weight"])
    imgs = _images(2, 7, size=40)
    pool, lu, lg = net(imgs)
    assert pool.shape == (2, 2048) and lu.shape == (2, 1008) and torch.isfinite(pool).all()
    assert pool.std() > 0 and not torch.allclose(pool[0], pool[1])
    assert torch.allclose(lg - lu, sd["fc.bias"].expand(2, -1), atol=1e-4)
    assert torch.allclose(lu, pool @ sd["fc.weight"].t(), atol=1e-3)
    # float [0,1] input = the same 8-bit images
    assert torch.allclose(net.select("2048")(imgs.float() / 255), pool, atol=1e-5)
    # a wrong file is rejected with a clear error
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(RuntimeError, match="not a TF-Inception FID state dict"):
        inception_from_local(bad)
