"""Distribution metrics: FID, IS, KID and improved precision/recall (k=3), all from one Inception pass.

* :class:`GenerativeMetrics` — one ``torchmetrics.Metric`` computing FID (sum/cov states), improved precision/recall
  with k=3 (``cat`` feature states; Kynkäänniemi et al. 2019, as openai/guided-diffusion ``evaluations/evaluator.py``)
  and optionally IS (``cat`` logit states; ADM-style fixed-size splits) from the SAME features of one forward.
* :func:`fid_metric`, :func:`kid_metric`, :func:`is_metric` — torchmetrics' FID/KID/IS with an injected extractor.
* Pure functions: :func:`frechet_distance`, :func:`improved_precision_recall`, :func:`inception_score_from_logits`.

The default extractor is the local TF Inception of :mod:`ctrlgen.lightning_modules.metrics.inception`. Any ``nn.Module`` can
be the ``feature`` extractor (unit tests inject a tiny conv + mean-pool net): it receives the images untouched and
returns (N,D) features, or a ``(features, logits)`` tuple, or a dict with ``"features"`` and ``"logits"`` keys. It
should expose ``num_features`` (else a dummy forward runs at construction).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from .inception import FIDInceptionV3, inception_from_local

__all__ = [
    "GenerativeMetrics",
    "fid_metric",
    "frechet_distance",
    "gaussian_stats",
    "improved_precision_recall",
    "inception_score_from_logits",
    "is_metric",
    "kid_metric",
]


# ============================================================================ pure metric functions
def _np64(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def gaussian_stats(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (``np.cov(rowvar=False)``) of (N,D) features, float64."""
    f = _np64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N>=2, D) features, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sym_sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) in float64.

    Tr((S1 S2)^½) is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    S1^½ S2 S1^½ (same spectrum as S1 S2), which is stable for singular covariances (N < D).
    """
    mu1, mu2 = _np64(mu1).ravel(), _np64(mu2).ravel()
    s1, s2 = np.atleast_2d(_np64(sigma1)), np.atleast_2d(_np64(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    r1 = _sym_sqrt_psd(s1)
    m = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances, clamped at 0 (||a||² + ||b||² - 2 a·b, as the ADM evaluator)."""
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None] - 2.0 * (a @ b.t())
    return d.clamp_min_(0)


def _knn_radii(feats: Tensor, k: int, batch: int) -> Tensor:
    """Squared distance to the k-th nearest neighbour (self excluded: index k of the sorted row incl. self)."""
    n = feats.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} samples for k-NN radii, got {n}")
    out = torch.empty(n, dtype=feats.dtype, device=feats.device)
    for i in range(0, n, batch):
        d = _sq_dists(feats[i:i + batch], feats)
        out[i:i + batch] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def _in_manifold(query: Tensor, ref: Tensor, ref_radii: Tensor, batch: int) -> Tensor:
    """For each query: is it within the k-NN ball of at least one reference sample?"""
    hit = torch.zeros(query.shape[0], dtype=torch.bool, device=query.device)
    for i in range(0, query.shape[0], batch):
        q = query[i:i + batch]
        acc = torch.zeros(q.shape[0], dtype=torch.bool, device=query.device)
        for j in range(0, ref.shape[0], batch):
            acc |= (_sq_dists(q, ref[j:j + batch]) <= ref_radii[j:j + batch][None]).any(1)
        hit[i:i + batch] = acc
    return hit


def improved_precision_recall(real_features: Tensor | np.ndarray, fake_features: Tensor | np.ndarray,
                              k: int = 3, batch_size: int = 10000, dtype: torch.dtype = torch.float32,
                              ) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019) with k-NN manifolds, as the ADM evaluator (k=3).

    precision = fraction of fake samples inside the real manifold (union of balls around each real sample with
    radius = distance to its k-th nearest real neighbour); recall = fraction of real samples inside the fake
    manifold. Distances in ``dtype`` (ADM uses fp16 with fp32 fallback; float32 here), blockwise (memory O(batch·N)).
    """
    r = torch.as_tensor(real_features).to(dtype=dtype)
    f = torch.as_tensor(fake_features).to(device=r.device, dtype=dtype)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"features must be (N,D) with equal D, got {tuple(r.shape)} and {tuple(f.shape)}")
    r_radii = _knn_radii(r, k, batch_size)
    f_radii = _knn_radii(f, k, batch_size)
    precision = _in_manifold(f, r, r_radii, batch_size).double().mean().item()
    recall = _in_manifold(r, f, f_radii, batch_size).double().mean().item()
    return precision, recall


def inception_score_from_logits(logits: Tensor | np.ndarray, *, split_size: int | None = 5000,
                                splits: int | None = None) -> tuple[float, float]:
    """Inception score exp(E_x KL(p(y|x) || p(y))) per split; returns (mean, std) over splits.

    Default: consecutive splits of ``split_size`` samples, as the ADM evaluator (50k → 10 splits, unshuffled);
    or ``splits=n`` equal chunks (``np.array_split``). Float64 softmax of the given logits.
    """
    lg = torch.as_tensor(logits).double().cpu()
    if lg.ndim != 2 or lg.shape[0] < 1:
        raise ValueError(f"expected (N,C) logits, got shape {tuple(lg.shape)}")
    n = lg.shape[0]
    if splits is not None:
        bounds = np.array_split(np.arange(n), splits)
        chunks = [(int(b[0]), int(b[-1]) + 1) for b in bounds if len(b)]
    else:
        step = n if not split_size else int(split_size)
        chunks = [(i, min(i + step, n)) for i in range(0, n, step)]
    logp = torch.log_softmax(lg, dim=1)
    scores = []
    for a, b in chunks:
        lp = logp[a:b]
        p = lp.exp()
        log_py = torch.logsumexp(lp, 0) - np.log(b - a)  # log of mean_x p(y|x)
        kl = (p * (lp - log_py[None])).sum(1).mean()
        scores.append(float(torch.exp(kl)))
    s = np.asarray(scores)
    return float(s.mean()), float(s.std())


# ============================================================================ one-pass metric
def _split_output(out: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(out, Tensor):
        return out, None
    if isinstance(out, Mapping):
        return out["features"], out.get("logits")
    if isinstance(out, (tuple, list)) and len(out) in (1, 2):
        return out[0], (out[1] if len(out) == 2 else None)
    raise TypeError("feature extractor must return a Tensor, a (features, logits) tuple or a dict with 'features'")


class GenerativeMetrics(Metric):
    """FID + improved precision/recall (k=3) + optionally IS from ONE feature pass per image batch.

    ``update(imgs, real: bool)``; ``compute()`` → dict with ``fid``, ``precision``, ``recall`` (if ``compute_pr``),
    ``inception_score``/``inception_score_std`` (if ``compute_is``; fake images only).

    * ``feature``: an ``nn.Module`` (see module doc) or ``None`` to load :func:`inception_from_local` from
      ``inception_weights`` / ``$FID_INCEPTION_WEIGHTS`` / ``$TORCH_HOME``. With the Inception and ``compute_is``,
      the same forward also returns the unbiased logits.
    * ``reference``: precomputed real statistics (an object with ``mu``, ``sigma`` and optional ``features``; see
      :mod:`ctrlgen.lightning_modules.metrics.refstats`). Then ``update(..., real=True)`` is an error.
    * States: FID sums and covariance sums (float64, ``sum``), features/logits lists (``cat``): DDP-safe.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, feature: nn.Module | None = None, *, inception_weights: str | os.PathLike | None = None,
                 antialias: bool = False, compute_pr: bool = True, compute_is: bool = False, pr_k: int = 3,
                 pr_batch_size: int = 10000, is_split_size: int | None = 5000, is_splits: int | None = None,
                 reference: Any = None, reset_real_features: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if feature is None:
            net = inception_from_local(inception_weights, antialias=antialias)
            feature = net.select("2048", "logits_unbiased") if compute_is else net
        elif compute_is and isinstance(feature, FIDInceptionV3):
            feature = feature.select("2048", "logits_unbiased")
        # Not registered as a submodule: the (frozen, ~95 MB) extractor stays out of state_dict / checkpoints,
        # out of .parameters() (optimisers, DDP) and out of dtype casts; it follows the metric's device (_apply).
        object.__setattr__(self, "feature", feature)
        self.compute_pr = bool(compute_pr)
        self.compute_is = bool(compute_is)
        self.pr_k = int(pr_k)
        self.pr_batch_size = int(pr_batch_size)
        self.is_split_size = is_split_size
        self.is_splits = is_splits
        self.reset_real_features = bool(reset_real_features)

        nf = getattr(feature, "num_features", None)
        if isinstance(nf, Tensor):
            nf = int(nf.item())
        if not isinstance(nf, int):
            dummy = torch.randint(0, 255, (2, 3, 299, 299), dtype=torch.uint8)
            nf = int(_split_output(feature(dummy))[0].shape[-1])
        self.num_features = nf

        self.reference = None
        if reference is not None:
            self.set_reference(reference)

        d = nf
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_cov_sum", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
            if self.compute_pr:
                self.add_state(f"{side}_features", [], dist_reduce_fx="cat")
        if self.compute_is:
            self.add_state("fake_logits", [], dist_reduce_fx="cat")

    def _apply(self, fn: Any, exclude_state: Sequence[str] = "") -> nn.Module:
        this = super()._apply(fn, exclude_state)
        feat = this.__dict__.get("feature")
        if isinstance(feat, nn.Module):
            feat.to(this.device)
        return this

    def set_reference(self, reference: Any) -> None:
        mu = np.asarray(reference.mu, dtype=np.float64)
        sigma = np.asarray(reference.sigma, dtype=np.float64)
        if mu.shape != (self.num_features,) or sigma.shape != (self.num_features, self.num_features):
            raise ValueError(f"reference stats have dim {mu.shape}, feature extractor gives {self.num_features}")
        feats = getattr(reference, "features", None)
        if self.compute_pr and feats is None:
            raise ValueError("compute_pr=True needs reference features (save them with the reference statistics) "
                             "or pass compute_pr=False")
        self.reference = reference

    def _extract(self, imgs: Tensor) -> tuple[Tensor, Tensor | None]:
        feats, logits = _split_output(self.feature(imgs))
        if feats.ndim == 1:
            feats = feats[None]
        return feats.detach(), (logits.detach() if logits is not None else None)

    def update(self, imgs: Tensor, real: bool) -> None:
        if real and self.reference is not None:
            raise RuntimeError("GenerativeMetrics has precomputed reference statistics; update only with real=False")
        feats, logits = self._extract(imgs)
        f64 = feats.double()
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + f64.sum(0))
        setattr(self, f"{side}_cov_sum", getattr(self, f"{side}_cov_sum") + f64.t() @ f64)
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + f64.shape[0])
        if self.compute_pr:
            getattr(self, f"{side}_features").append(feats.float())
        if self.compute_is and not real:
            if logits is None:
                raise RuntimeError("compute_is=True but the feature extractor returned no logits")
            self.fake_logits.append(logits.float())

    @staticmethod
    def _stats(s: Tensor, cov_s: Tensor, n: Tensor) -> tuple[np.ndarray, np.ndarray]:
        n = int(n)
        mu = s / n
        cov = (cov_s - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), cov.cpu().numpy()

    def compute(self) -> dict[str, Tensor]:
        if int(self.fake_n) < 2 or (self.reference is None and int(self.real_n) < 2):
            raise RuntimeError("GenerativeMetrics needs at least 2 real and 2 fake samples")
        mu_f, s_f = self._stats(self.fake_sum, self.fake_cov_sum, self.fake_n)
        if self.reference is not None:
            mu_r, s_r = np.asarray(self.reference.mu), np.asarray(self.reference.sigma)
        else:
            mu_r, s_r = self._stats(self.real_sum, self.real_cov_sum, self.real_n)
        out = {"fid": torch.tensor(frechet_distance(mu_r, s_r, mu_f, s_f), dtype=torch.float32)}
        if self.compute_pr:
            fake = dim_zero_cat(self.fake_features)
            if self.reference is not None:
                real = torch.as_tensor(np.asarray(self.reference.features), dtype=torch.float32, device=fake.device)
            else:
                real = dim_zero_cat(self.real_features)
            p, r = improved_precision_recall(real, fake, k=self.pr_k, batch_size=self.pr_batch_size)
            out["precision"] = torch.tensor(p, dtype=torch.float32)
            out["recall"] = torch.tensor(r, dtype=torch.float32)
        if self.compute_is:
            m, s = inception_score_from_logits(dim_zero_cat(self.fake_logits), split_size=self.is_split_size,
                                               splits=self.is_splits)
            out["inception_score"] = torch.tensor(m, dtype=torch.float32)
            out["inception_score_std"] = torch.tensor(s, dtype=torch.float32)
        return out

    def reset(self) -> None:
        if self.reset_real_features:
            super().reset()
            return
        keep = {k: getattr(self, k) for k in ("real_sum", "real_cov_sum", "real_n")}
        if self.compute_pr:
            keep["real_features"] = list(self.real_features)
        super().reset()
        for k, v in keep.items():
            setattr(self, k, v)


# ============================================================================ torchmetrics wrappers
def _resolve_feature(feature: nn.Module | None, inception_weights, antialias: bool, output: str) -> nn.Module:
    if feature is None:
        return inception_from_local(inception_weights, outputs=(output,), antialias=antialias)
    if isinstance(feature, FIDInceptionV3) and feature.outputs != (output,):
        return feature.select(output)
    return feature


def fid_metric(feature: nn.Module | None = None, *, inception_weights=None, antialias: bool = False,
               **kwargs: Any):
    """torchmetrics ``FrechetInceptionDistance`` with an injected extractor (default: local TF Inception, 2048-d)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=_resolve_feature(feature, inception_weights, antialias, "2048"), **kwargs)


def kid_metric(feature: nn.Module | None = None, *, inception_weights=None, antialias: bool = False,
               **kwargs: Any):
    """torchmetrics ``KernelInceptionDistance`` with an injected extractor; remember ``subset_size <= N``."""
    from torchmetrics.image.kid import KernelInceptionDistance

    return KernelInceptionDistance(feature=_resolve_feature(feature, inception_weights, antialias, "2048"), **kwargs)


def is_metric(feature: nn.Module | None = None, *, inception_weights=None, antialias: bool = False,
              **kwargs: Any):
    """torchmetrics ``InceptionScore`` with an injected extractor returning N×C logits (default: the local
    Inception's unbiased logits). Note torchmetrics shuffles before splitting; :class:`GenerativeMetrics` follows
    the ADM evaluator (fixed consecutive splits) instead."""
    from torchmetrics.image.inception import InceptionScore

    return InceptionScore(feature=_resolve_feature(feature, inception_weights, antialias, "logits_unbiased"), **kwargs)
