"""The TF-Inception (2015-12-05) feature extractor of FID / IS / precision-recall, loaded from a local file.

* :class:`FIDInceptionV3` — the port used by FID everywhere (pytorch-fid / torch-fidelity / torchmetrics layout and
  state-dict keys), written here without torch-fidelity or torchvision (torch-fidelity 0.4 cannot be imported without
  torchvision, and installing it makes ``import torchmetrics`` fail in this venv). Resize defaults to TF1.x bilinear
  (``antialias=False``), as the ADM evaluator / published FIDs.
* :func:`inception_from_local` / :func:`resolve_inception_weights` — ``weights-inception-2015-12-05-6726825d.pth``
  from a **local file** only (argument, ``$FID_INCEPTION_WEIGHTS`` or ``$TORCH_HOME``); nothing is downloaded.
* :func:`tf1_bilinear_resize` — TF1.x ``resize_bilinear`` (align_corners=False, half_pixel_centers=False).

The metrics that use it are in :mod:`ctrlgen.lightning_modules.metrics.distribution`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctrlgen.lightning_modules.common.local_files import find_local_file

__all__ = [
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_FILENAME",
    "FIDInceptionV3",
    "inception_from_local",
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
    hub_dir = Path(torch.hub.get_dir())
    env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    roots = [path] if path is not None else [*([env] if env else []), hub_dir / "checkpoints"]
    found, tried = find_local_file(roots, INCEPTION_WEIGHTS_FILENAME)
    if found is not None:
        return found
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
