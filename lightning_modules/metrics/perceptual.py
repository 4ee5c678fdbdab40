"""LPIPS with a backbone from a local file (no download at run time).

torchmetrics' ``LearnedPerceptualImagePatchSimilarity`` ships the LPIPS v0.1 linear heads but builds its backbone
with torchvision from ``download.pytorch.org``, and needs torchvision at all. This module offers:

* ``backend="native"`` (default): a torchvision-free LPIPS (:class:`LPIPSNet`) whose backbones reproduce
  torchvision's ``alexnet`` / ``vgg16`` / ``squeezenet1_1`` ``features`` layout (same state-dict keys, so the
  torchvision checkpoint files load as they are) and the LPIPS v0.1 computation (scaling layer, channel-unit
  normalisation, squared difference, 1×1 linear heads shipped with torchmetrics, spatial mean, sum over layers).
* ``backend="torchmetrics"``: torchmetrics' own class built under a temporary ``TORCH_HOME`` that links the local
  file under its expected name (the TORCH_HOME trick; needs torchvision).

Expected backbone file names (torchvision): ``alexnet-owt-7be5be79.pth``, ``vgg16-397923af.pth``,
``squeezenet1_1-b8a52dc0.pth``. Inputs are in [-1,1], or [0,1] with ``normalize=True``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from ctrlgen.lightning_modules.common.local_files import find_local_file

__all__ = [
    "LPIPS",
    "LPIPS_BACKBONE_FILES",
    "LPIPS_TORCH_HOME_ENV",
    "LPIPSNet",
    "build_lpips_backbone",
    "lpips_from_local",
    "resolve_lpips_backbone",
]

LPIPS_TORCH_HOME_ENV = "LPIPS_TORCH_HOME"
LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
_ALIASES = {"alex": "alex", "alexnet": "alex", "vgg": "vgg", "vgg16": "vgg", "squeeze": "squeeze",
            "squeezenet": "squeeze", "squeezenet1_1": "squeeze"}
# (slice boundaries into `features`, channels of each tapped layer) — LPIPS v0.1 taps
_TAPS = {
    "alex": ([0, 2, 5, 8, 10, 12], [64, 192, 384, 256, 256]),
    "vgg": ([0, 4, 9, 16, 23, 30], [64, 128, 256, 512, 512]),
    "squeeze": ([0, 2, 5, 8, 10, 11, 12, 13], [64, 128, 256, 384, 384, 512, 512]),
}


def _net(net_type: str) -> str:
    try:
        return _ALIASES[net_type]
    except KeyError:
        raise ValueError(f"net_type must be one of {sorted(set(_ALIASES))}, got {net_type!r}") from None


class _Fire(nn.Module):
    """SqueezeNet fire module (submodule names as torchvision: squeeze / expand1x1 / expand3x3)."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        s = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(s)), F.relu(self.expand3x3(s))], 1)


def build_lpips_backbone(net_type: str) -> nn.Sequential:
    """An ``nn.Sequential`` with torchvision's ``<model>.features`` indices (so ``features.N.*`` keys load)."""
    net = _net(net_type)
    relu = lambda: nn.ReLU(inplace=False)
    if net == "alex":
        layers = [nn.Conv2d(3, 64, 11, stride=4, padding=2), relu(), nn.MaxPool2d(3, 2),
                  nn.Conv2d(64, 192, 5, padding=2), relu(), nn.MaxPool2d(3, 2),
                  nn.Conv2d(192, 384, 3, padding=1), relu(),
                  nn.Conv2d(384, 256, 3, padding=1), relu(),
                  nn.Conv2d(256, 256, 3, padding=1), relu(), nn.MaxPool2d(3, 2)]
    elif net == "vgg":
        layers = []
        cin = 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), relu()]
                cin = v
    else:
        pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)
        layers = [nn.Conv2d(3, 64, 3, stride=2), relu(), pool(),
                  _Fire(64, 16, 64, 64), _Fire(128, 16, 64, 64), pool(),
                  _Fire(128, 32, 128, 128), _Fire(256, 32, 128, 128), pool(),
                  _Fire(256, 48, 192, 192), _Fire(384, 48, 192, 192),
                  _Fire(384, 64, 256, 256), _Fire(512, 64, 256, 256)]
    return nn.Sequential(*layers)


def _lin_heads_path(net: str) -> Path:
    spec = importlib.util.find_spec("torchmetrics")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "functional" / "image" / "lpips_models" / f"{net}.pth"


class LPIPSNet(nn.Module):
    """LPIPS v0.1 distance (torchvision-free). ``forward(a, b) -> (N,)``; frozen, always eval.

    ``backbone_state_dict``: torchvision-format state dict (keys ``features.N.*``; ``classifier.*`` ignored).
    ``lin_state_dict``: LPIPS heads (default: the ones shipped inside torchmetrics). ``source``: where the backbone
    came from (a file), named in the error when its keys or shapes do not fit.
    """

    def __init__(self, net_type: str = "alex", backbone_state_dict: Mapping[str, Tensor] | None = None,
                 lin_state_dict: Mapping[str, Tensor] | None = None, *, normalize: bool = False,
                 source: str | None = None) -> None:
        super().__init__()
        self.net_type = _net(net_type)
        self.normalize = bool(normalize)
        self.features = build_lpips_backbone(self.net_type)
        bounds, chns = _TAPS[self.net_type]
        self.bounds = bounds
        self.lins = nn.ModuleList(nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False)) for c in chns)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        if backbone_state_dict is not None:
            sd = {k: v for k, v in backbone_state_dict.items() if k.startswith("features.")}
            want = self.features.state_dict(prefix="features.")
            missing, unexpected = sorted(want.keys() - sd.keys()), sorted(sd.keys() - want.keys())
            shapes = [f"{k}: expected {tuple(want[k].shape)}, found {tuple(sd[k].shape)}" for k in want
                      if k in sd and sd[k].shape != want[k].shape]
            if missing or unexpected or shapes:
                raise RuntimeError(f"backbone state dict{f' in {source}' if source else ''} does not match "
                                   f"torchvision's {self.net_type} features: missing {missing[:5]}, unexpected "
                                   f"{unexpected[:5]}, mis-shaped {shapes[:5]}")
            self.features.load_state_dict({k[len("features."):]: v for k, v in sd.items()})
        if lin_state_dict is None:
            lin_state_dict = torch.load(_lin_heads_path(self.net_type), map_location="cpu", weights_only=True)
        # lpips key layout: lin{i}.model.1.weight
        for i, lin in enumerate(self.lins):
            lin[1].weight.data.copy_(lin_state_dict[f"lin{i}.model.1.weight"])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPSNet:
        return super().train(False)

    def _taps(self, x: Tensor) -> list[Tensor]:
        outs = []
        for a, b in zip(self.bounds[:-1], self.bounds[1:]):
            for i in range(a, b):
                x = self.features[i](x)
            outs.append(x)
        return outs

    def forward(self, img1: Tensor, img2: Tensor) -> Tensor:
        if self.normalize:
            img1, img2 = 2 * img1 - 1, 2 * img2 - 1
        x1 = (img1.to(self.shift.dtype) - self.shift) / self.scale
        x2 = (img2.to(self.shift.dtype) - self.shift) / self.scale
        total = 0.0
        for f1, f2, lin in zip(self._taps(x1), self._taps(x2), self.lins):
            n1 = f1 / torch.sqrt((f1 * f1).sum(1, keepdim=True) + 1e-8)
            n2 = f2 / torch.sqrt((f2 * f2).sum(1, keepdim=True) + 1e-8)
            total = total + lin((n1 - n2) ** 2).mean((2, 3))
        return total.view(-1)  # type: ignore[union-attr]


class LPIPS(Metric):
    """LPIPS as a ``Metric``: ``update(img1, img2)``; ``compute()`` → mean (``reduction="mean"``), sum, or all
    per-pair values (``"none"``). DDP-safe states (sum/count, or a ``cat`` list for ``"none"``)."""

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    def __init__(self, net: LPIPSNet, *, reduction: str = "mean", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.net = net
        self.reduction = reduction
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if reduction == "none":
            self.add_state("scores", [], dist_reduce_fx="cat")

    def update(self, img1: Tensor, img2: Tensor) -> None:
        if img1.shape != img2.shape or img1.ndim != 4 or img1.shape[1] != 3:
            raise ValueError(
                f"expected two (N,3,H,W) batches of equal shape, got {tuple(img1.shape)}, {tuple(img2.shape)}"
            )
        lo = 0.0 if self.net.normalize else -1.0
        if img1.min() < lo - 1e-6 or img2.min() < lo - 1e-6 or img1.max() > 1 + 1e-6 or img2.max() > 1 + 1e-6:
            raise ValueError(f"LPIPS inputs must lie in [{lo:g}, 1] (normalize={self.net.normalize})")
        d = self.net(img1, img2)
        self.score_sum += d.detach().double().sum()
        self.count += d.numel()
        if self.reduction == "none":
            self.scores.append(d.detach())

    def compute(self) -> Tensor:
        if self.reduction == "none":
            return dim_zero_cat(self.scores)
        if self.reduction == "sum":
            return self.score_sum.float()
        return (self.score_sum / self.count.clamp_min(1)).float()


def resolve_lpips_backbone(net_type: str, weights_path: str | os.PathLike | None = None) -> Path:
    """Find the torchvision backbone file for ``net_type``.

    ``weights_path`` may be the file itself, a folder holding it, or a TORCH_HOME-style folder
    (``<dir>/hub/checkpoints/<file>``); otherwise ``$LPIPS_TORCH_HOME`` (TORCH_HOME-style or flat) and then
    ``$TORCH_HOME/hub/checkpoints``. Raises ``FileNotFoundError`` naming the expected file.
    """
    net = _net(net_type)
    name = LPIPS_BACKBONE_FILES[net]
    env = os.environ.get(LPIPS_TORCH_HOME_ENV)
    roots = [weights_path] if weights_path is not None else [*([env] if env else []),
                                                             Path(torch.hub.get_dir()) / "checkpoints"]
    found, tried = find_local_file(roots, name, subdirs=("", "checkpoints", "hub/checkpoints"))
    if found is not None:
        return found
    raise FileNotFoundError(
        f"LPIPS backbone '{name}' ({net}) not found (looked at: {', '.join(tried)}). Place the "
        f"torchvision checkpoint file under that name in $TORCH_HOME/hub/checkpoints/, or set "
        f"{LPIPS_TORCH_HOME_ENV} to a folder holding it (flat or as hub/checkpoints/), or pass its path. "
        f"Nothing is downloaded at run time."
    )


@contextlib.contextmanager
def _temporary_torch_home(files: Mapping[str, Path]) -> Iterator[str]:
    """A temporary TORCH_HOME whose hub/checkpoints links ``files`` (name -> source) — the TORCH_HOME trick."""
    with tempfile.TemporaryDirectory(prefix="ctrlgen_torch_home_") as home:
        ck = Path(home) / "hub" / "checkpoints"
        ck.mkdir(parents=True)
        for fname, src in files.items():
            try:
                (ck / fname).symlink_to(Path(src).resolve())
            except OSError:
                import shutil

                shutil.copyfile(src, ck / fname)
        old_env = os.environ.get("TORCH_HOME")
        old_hub = getattr(torch.hub, "_hub_dir", None)
        os.environ["TORCH_HOME"] = home
        if old_hub is not None:
            torch.hub.set_dir(str(Path(home) / "hub"))
        try:
            yield home
        finally:
            if old_env is None:
                os.environ.pop("TORCH_HOME", None)
            else:
                os.environ["TORCH_HOME"] = old_env
            if old_hub is not None:
                torch.hub.set_dir(old_hub)


def lpips_from_local(net_type: str = "alex", weights_path: str | os.PathLike | None = None, *,
                     normalize: bool = False, reduction: str = "mean", backend: str = "native", **kwargs: Any):
    """LPIPS metric with the backbone read from a local file (see :func:`resolve_lpips_backbone`).

    ``backend="native"`` → :class:`LPIPS` (no torchvision needed). ``backend="torchmetrics"`` → torchmetrics'
    ``LearnedPerceptualImagePatchSimilarity`` built under a temporary TORCH_HOME holding the file (needs torchvision).
    """
    net = _net(net_type)
    path = resolve_lpips_backbone(net, weights_path)
    if backend == "native":
        sd = torch.load(path, map_location="cpu", weights_only=True)
        return LPIPS(LPIPSNet(net, sd, normalize=normalize, source=str(path)), reduction=reduction, **kwargs)
    if backend == "torchmetrics":
        if importlib.util.find_spec("torchvision") is None:
            raise ModuleNotFoundError("backend='torchmetrics' needs torchvision; use backend='native'")
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        with _temporary_torch_home({LPIPS_BACKBONE_FILES[net]: path}):
            return LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=normalize, reduction=reduction,
                                                         **kwargs)
    raise ValueError(f"backend must be 'native' or 'torchmetrics', got {backend!r}")
