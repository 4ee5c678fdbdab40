"""Distribution metrics: FID, IS, KID and improved precision/recall (k=3), all from one Inception pass.

* :class:`FIDInceptionV3` — the TF-Inception (2015-12-05) port used by FID everywhere (pytorch-fid / torch-fidelity /
  torchmetrics layout and state-dict keys), written here without torch-fidelity or torchvision (torch-fidelity 0.4
  cannot be imported without torchvision, and installing it makes ``import torchmetrics`` fail in this venv).
  It loads ``weights-inception-2015-12-05-6726825d.pth`` from a **local file** only: :func:`inception_from_local`.
  Resize defaults to TF1.x bilinear (``antialias=False``), as the ADM evaluator / published FIDs.
* :class:`GenerativeMetrics` — one ``torchmetrics.Metric`` computing FID (sum/cov states), improved precision/recall
  with k=3 (``cat`` feature states; Kynkäänniemi et al. 2019, as openai/guided-diffusion ``evaluations/evaluator.py``)
  and optionally IS (``cat`` logit states; ADM-style fixed-size splits) from the SAME features of one forward.
* :func:`fid_metric`, :func:`kid_metric`, :func:`is_metric` — torchmetrics' FID/KID/IS with an injected extractor.
* Pure functions: :func:`frechet_distance`, :func:`improved_precision_recall`, :func:`inception_score_from_logits`,
  :func:`tf1_bilinear_resize`.

Any ``nn.Module`` can be the ``feature`` extractor (unit tests inject a tiny conv + mean-pool net): it receives the
images untouched and returns (N,D) features, or a ``(features, logits)`` tuple, or a dict with ``"features"`` and
``"logits"`` keys. It should expose ``num_features`` (else a dummy forward runs at construction).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

__all__ = [
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_FILENAME",
    "FIDInceptionV3",
    "GenerativeMetrics",
    "fid_metric",
    "frechet_distance",
    "gaussian_stats",
    "improved_precision_recall",
    "inception_from_local",
    "inception_score_from_logits",
    "is_metric",
    "kid_metric",
    "resolve_inception_weights",
    "tf1_bilinear_resize",
]

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_ENV = "FID_INCEPTION_WEIGHTS"
_INCEPTION_OUTPUTS = ("64", "192", "768", "2048", "logits_unbiased", "logits")
_OUTPUT_DIMS = {"64": 64, "192": 192, "768": 768, "2048": 2048, "logits_unbiased": 1008, "logits": 1008}


# ============================================================================ resize
def tf1_bilinear_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize as TensorFlow 1.x ``resize_bilinear(align_corners=False, half_pixel_centers=False)``.

    Source coordinate of output pixel ``i`` is ``i * in/out`` (no half-pixel offset), neighbours ``floor`` and
    ``floor + 1`` clamped to the border. This is the resize inside the TF Inception graph used by FID/ADM.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError("tf1_bilinear_resize expects a floating (N,C,H,W) tensor")
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = x.shape[-2:]

    def axis(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
        # float32 source coordinates, as TF's kernel (float scale)
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        src = torch.arange(n_out, dtype=torch.float32, device=x.device) * scale
        lo = src.floor().long().clamp_(0, n_in - 1)
        hi = (lo + 1).clamp_(max=n_in - 1)
        frac = (src - lo.float()).to(x.dtype)
        return lo, hi, frac

    y0, y1, fy = axis(in_h, out_h)
    x0, x1, fx = axis(in_w, out_w)
    top = x.index_select(2, y0)
    bot = x.index_select(2, y1)
    fx = fx.view(1, 1, 1, -1)
    top = top.index_select(3, x0) + (top.index_select(3, x1) - top.index_select(3, x0)) * fx
    bot = bot.index_select(3, x0) + (bot.index_select(3, x1) - bot.index_select(3, x0)) * fx
    return top + (bot - top) * fy.view(1, 1, -1, 1)


# ============================================================================ Inception (TF port layout)
class _ConvBN(nn.Module):
    """conv (no bias) → BatchNorm(eps=1e-3) → ReLU; submodules named ``conv``/``bn`` to match the weight file."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: Tensor) -> Tensor:
    # TF average pooling ignores the zero padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _Mixed35(nn.Module):  # Mixed_5b/5c/5d
    def __init__(self, cin: int, pool_ch: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], 1)


class _Reduce35to17(nn.Module):  # Mixed_6a
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class _Mixed17(nn.Module):  # Mixed_6b..6e (factorised 7x7)
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = x
        for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            c = m(c)
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], 1)


class _Reduce17to8(nn.Module):  # Mixed_7a
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class _Mixed8(nn.Module):  # Mixed_7b (avg pool branch) / Mixed_7c (max pool branch: a quirk of the TF graph)
    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        p = _avg3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([a, b, c, self.branch_pool(p)], 1)


class FIDInceptionV3(nn.Module):
    """TF Inception-v3 (2015-12-05) feature extractor for FID/IS/P-R; frozen, always in eval mode.

    Input: (N,3,H,W) uint8 [0,255], or floating in [0,1] (scaled ×255, rounded to the 8-bit grid like a saved PNG
    unless ``quantize_float=False``). Resized to 299² (TF1 bilinear by default, ``antialias=True`` for torch's
    antialiased resize as torchmetrics' default), scaled to [-1,1].

    ``outputs`` picks what ``forward`` returns, from ``"64"``, ``"192"``, ``"768"``, ``"2048"`` (pool3 features),
    ``"logits_unbiased"`` (pool3 @ fc.weight.T, what ADM/torch-fidelity use for IS), ``"logits"``: one name → a
    tensor, several → a tuple in that order. :meth:`select` gives a view with other outputs sharing the weights.
    """

    INPUT_SIZE = 299

    def __init__(self, outputs: str | Sequence[str] = ("2048",), *, antialias: bool = False,
                 quantize_float: bool = True) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _Mixed35(192, 32)
        self.Mixed_5c = _Mixed35(256, 64)
        self.Mixed_5d = _Mixed35(288, 64)
        self.Mixed_6a = _Reduce35to17(288)
        self.Mixed_6b = _Mixed17(768, 128)
        self.Mixed_6c = _Mixed17(768, 160)
        self.Mixed_6d = _Mixed17(768, 160)
        self.Mixed_6e = _Mixed17(768, 192)
        self.Mixed_7a = _Reduce17to8(768)
        self.Mixed_7b = _Mixed8(1280, "avg")
        self.Mixed_7c = _Mixed8(2048, "max")
        self.fc = nn.Linear(2048, 1008)
        self.antialias = bool(antialias)
        self.quantize_float = bool(quantize_float)
        self.outputs = self._check_outputs(outputs)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _check_outputs(outputs: str | Sequence[str]) -> tuple[str, ...]:
        outs = (outputs,) if isinstance(outputs, str) else tuple(str(o) for o in outputs)
        bad = [o for o in outs if o not in _INCEPTION_OUTPUTS]
        if not outs or bad:
            raise ValueError(f"outputs must be a non-empty subset of {_INCEPTION_OUTPUTS}, got {outputs!r}")
        return outs

    @property
    def num_features(self) -> int:
        return _OUTPUT_DIMS[self.outputs[0]]

    def train(self, mode: bool = True) -> FIDInceptionV3:
        return super().train(False)

    def select(self, *outputs: str) -> _InceptionView:
        """A module sharing these weights whose ``forward`` returns ``outputs`` instead."""
        return _InceptionView(self, outputs)

    def preprocess(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (N,3,H,W) images, got shape {tuple(x.shape)}")
        dtype = self.fc.weight.dtype
        if x.dtype == torch.uint8:
            x = x.to(dtype)
        elif x.is_floating_point():
            x = x.to(dtype) * 255.0
            if self.quantize_float:
                x = x.round().clamp(0, 255)
        else:
            raise TypeError(f"expected uint8 or floating images, got {x.dtype}")
        if tuple(x.shape[-2:]) != (self.INPUT_SIZE, self.INPUT_SIZE):
            if self.antialias:
                x = F.interpolate(x, size=(self.INPUT_SIZE,) * 2, mode="bilinear", align_corners=False, antialias=True)
            else:
                x = tf1_bilinear_resize(x, (self.INPUT_SIZE, self.INPUT_SIZE))
        # channels_last: ~1.6x faster convolutions on CPU (oneDNN), also fine on GPU
        return ((x - 128.0) / 128.0).contiguous(memory_format=torch.channels_last)

    def forward_all(self, x: Tensor, outputs: Sequence[str]) -> dict[str, Tensor]:
        want = set(outputs)
        res: dict[str, Tensor] = {}

        def pooled(t: Tensor) -> Tensor:
            return t.mean((2, 3)).float()

        x = self.preprocess(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        if "64" in want:
            res["64"] = pooled(x)
            if want <= res.keys():
                return res
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        if "192" in want:
            res["192"] = pooled(x)
            if want <= res.keys():
                return res
        for m in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                  self.Mixed_6d, self.Mixed_6e):
            x = m(x)
        if "768" in want:
            res["768"] = pooled(x)
            if want <= res.keys():
                return res
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = x.mean((2, 3))
        res["2048"] = pool.float()
        if "logits_unbiased" in want or "logits" in want:
            unbiased = pool @ self.fc.weight.t()
            res["logits_unbiased"] = unbiased.float()
            res["logits"] = (unbiased + self.fc.bias).float()
        return res

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        with torch.no_grad():
            res = self.forward_all(x, self.outputs)
        out = tuple(res[o] for o in self.outputs)
        return out[0] if len(out) == 1 else out


class _InceptionView(nn.Module):
    """Shares a :class:`FIDInceptionV3`'s weights, returns other outputs."""

    def __init__(self, net: FIDInceptionV3, outputs: Sequence[str]) -> None:
        super().__init__()
        self.net = net
        self.outputs = FIDInceptionV3._check_outputs(outputs)

    @property
    def num_features(self) -> int:
        return _OUTPUT_DIMS[self.outputs[0]]

    def train(self, mode: bool = True) -> _InceptionView:
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        with torch.no_grad():
            res = self.net.forward_all(x, self.outputs)
        out = tuple(res[o] for o in self.outputs)
        return out[0] if len(out) == 1 else out


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """Where the Inception weights are: ``path``, else ``$FID_INCEPTION_WEIGHTS``, else
    ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`` (the TORCH_HOME trick).

    ``path`` may be the file or a directory holding it. Raises ``FileNotFoundError`` naming the file and the places
    looked at; nothing is downloaded.
    """
    tried: list[str] = []
    candidates: list[Path] = []
    if path is not None:
        candidates.append(Path(path).expanduser())
    env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if path is None and env:
        candidates.append(Path(env).expanduser())
    hub_dir = Path(torch.hub.get_dir())
    if path is None:
        candidates.append(hub_dir / "checkpoints" / INCEPTION_WEIGHTS_FILENAME)
    for c in candidates:
        f = c / INCEPTION_WEIGHTS_FILENAME if c.is_dir() else c
        tried.append(str(f))
        if f.is_file():
            return f
    raise FileNotFoundError(
        f"FID Inception weights not found (looked at: {', '.join(tried)}). Expected the file "
        f"'{INCEPTION_WEIGHTS_FILENAME}' (TF Inception 2015-12-05 ported to PyTorch, 95.7 MB, as used by "
        f"torch-fidelity/torchmetrics; pytorch-fid's 'pt_inception-2015-12-05-6726825d.pth' has the same layout). "
        f"Put it anywhere and set the environment variable "
        f"{INCEPTION_WEIGHTS_ENV}=/path/to/{INCEPTION_WEIGHTS_FILENAME}, "
        f"pass the path explicitly, or place it at {hub_dir / 'checkpoints' / INCEPTION_WEIGHTS_FILENAME} "
        f"($TORCH_HOME/hub/checkpoints/). Nothing is downloaded at run time."
    )


def inception_from_local(path: str | os.PathLike | None = None, *,
                         outputs: str | Sequence[str] = ("2048",), antialias: bool = False,
                         device: str | torch.device | None = None,
                         dtype: torch.dtype = torch.float32) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` and load the local weight file (see :func:`resolve_inception_weights`).

    The state dict must match exactly (``num_batches_tracked`` buffers may be present or absent).
    """
    f = resolve_inception_weights(path)
    sd = torch.load(f, map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    with torch.device("meta"):  # skip the random init of 23.9M parameters (seconds on CPU): all are loaded
        net = FIDInceptionV3(outputs, antialias=antialias)
    net = net.to_empty(device="cpu")
    for name, buf in net.named_buffers():
        if name.endswith("num_batches_tracked"):
            buf.zero_()
    res = net.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or res.unexpected_keys:
        raise RuntimeError(
            f"{f} is not a TF-Inception FID state dict: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {res.unexpected_keys[:5]}{'...' if len(res.unexpected_keys) > 5 else ''}"
        )
    return net.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()


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
      :mod:`lightning_modules.metrics.refstats`). Then ``update(..., real=True)`` is an error.
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
