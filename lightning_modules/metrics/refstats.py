"""Reference (real-data) Inception statistics: compute once, save to ``.npz``, reuse for FID / P-R.

``.npz`` layout (written by :meth:`RefStats.save`): ``mu`` (D,), ``sigma`` (D,D) float64 (unbiased covariance),
optional ``features`` (N,D) float32 (needed for precision/recall), ``num_samples``, ``meta`` (JSON string).
:func:`load_refstats` also reads ADM reference batches (``VIRTUAL_imagenet256_labeled.npz``: ``mu``, ``sigma``,
``arr_0`` images); to get features for P/R from those, run :func:`compute_refstats` on the ``.npz`` (``arr_0``).

Sources for :func:`compute_refstats` / :func:`refstats_cli`:

* WebDataset shards: a brace/glob pattern or list (``/data/val-{000000..000009}.tar``, ``/data/val-*.tar``), image
  under ``image_key`` (``"auto"``: first of ``jpg``/``png``/``jpeg``/``webp`` present);
* an image folder (recursive; .png/.jpg/.jpeg/.webp/.bmp), sorted;
* an ``.npz`` with ``arr_0`` (N,H,W,3) uint8 (ADM reference batch).
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .distribution import GenerativeMetrics, _split_output
from .inception import inception_from_local

__all__ = [
    "FIDFromStats",
    "RefStats",
    "compute_refstats",
    "iter_images",
    "load_refstats",
    "refstats_cli",
]

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_AUTO_KEYS = ("jpg", "png", "jpeg", "webp")


@dataclass
class RefStats:
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    num_samples: int = 0
    meta: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {
            "mu": np.asarray(self.mu, dtype=np.float64),
            "sigma": np.asarray(self.sigma, dtype=np.float64),
            "num_samples": np.asarray(int(self.num_samples)),
            "meta": np.asarray(json.dumps(self.meta)),
        }
        if self.features is not None:
            arrays["features"] = np.asarray(self.features, dtype=np.float32)
        with open(path, "wb") as fh:  # np.savez on a path would append ".npz" to other suffixes
            np.savez(fh, **arrays)
        return path


def load_refstats(path: str | os.PathLike) -> RefStats:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference statistics file {str(path)!r} not found (make it with `ctrlgen data refstats`)"
        )
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z or "sigma" not in z:
            raise KeyError(f"{path} has no 'mu'/'sigma' arrays (keys: {list(z.keys())})")
        feats = z.get("features")
        n = int(z["num_samples"]) if "num_samples" in z else (len(feats) if feats is not None else 0)
        meta = json.loads(str(z["meta"])) if "meta" in z else {}
        return RefStats(mu=z["mu"].astype(np.float64), sigma=z["sigma"].astype(np.float64), features=feats,
                        num_samples=n, meta=meta)


# ------------------------------------------------------------------------------------------------ image sources
def _expand(spec: str | Sequence[str]) -> list[str]:
    import braceexpand

    out: list[str] = []
    for item in [spec] if isinstance(spec, (str, os.PathLike)) else list(spec):
        for part in str(item).split("::"):
            for p in braceexpand.braceexpand(part.strip()):
                if any(c in p for c in "*?["):
                    out.extend(sorted(glob.glob(os.path.expanduser(p))))
                elif p:
                    out.append(p)
    return out


def _pil_to_chw_uint8(img) -> Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _count(source: str | Sequence[str]) -> int | None:
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            return sum(1 for f in p.rglob("*") if f.suffix.lower() in _IMAGE_EXTS)
        if p.suffix == ".npz" and p.is_file():
            with np.load(p, mmap_mode="r") as z:
                return int(z["arr_0"].shape[0]) if "arr_0" in z else None
    return None


def iter_images(source: str | Sequence[str], image_key: str = "auto") -> Iterator[Tensor]:
    """Yield (3,H,W) uint8 RGB tensors from a folder, an ADM ``.npz`` or WebDataset shards."""
    from PIL import Image

    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        files = sorted(f for f in Path(source).rglob("*") if f.suffix.lower() in _IMAGE_EXTS)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(_IMAGE_EXTS)}) under {source}")
        for f in files:
            with Image.open(f) as im:
                yield _pil_to_chw_uint8(im)
        return
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz"):
        with np.load(source, mmap_mode="r") as z:
            if "arr_0" not in z:
                raise KeyError(f"{source} has no 'arr_0' image array")
            arr = z["arr_0"]
            for i in range(arr.shape[0]):
                yield torch.from_numpy(np.ascontiguousarray(arr[i])).permute(2, 0, 1)
        return

    import webdataset as wds

    urls = _expand(source)
    local_missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if not urls or local_missing:
        raise FileNotFoundError(f"no WebDataset shards / image folder match {source!r}"
                                + (f" (missing: {local_missing[:3]})" if local_missing else ""))
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False)
    for sample in ds:
        key = image_key
        if key == "auto":
            key = next((k for k in _AUTO_KEYS if k in sample), None)
            if key is None:
                raise KeyError(f"sample {sample.get('__key__')!r} has none of {_AUTO_KEYS}: {sorted(sample)}")
        if key not in sample:
            raise KeyError(f"sample {sample.get('__key__')!r} has no {key!r} entry: {sorted(sample)}")
        with Image.open(io.BytesIO(sample[key])) as im:
            yield _pil_to_chw_uint8(im)


def _batches(it: Iterable[Tensor], batch_size: int) -> Iterator[list[Tensor]]:
    buf: list[Tensor] = []
    for x in it:
        buf.append(x)
        if len(buf) == batch_size:
            yield buf
            buf = []
    if buf:
        yield buf


@torch.no_grad()
def _extract(feature: nn.Module, imgs: list[Tensor], device: torch.device) -> Tensor:
    """Features for a list of images; images of different sizes are run in same-size groups (order kept)."""
    out: list[Tensor | None] = [None] * len(imgs)
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(imgs):
        groups.setdefault(tuple(im.shape), []).append(i)
    for idx in groups.values():
        x = torch.stack([imgs[i] for i in idx]).to(device)
        f, _ = _split_output(feature(x))
        for j, i in enumerate(idx):
            out[i] = f[j].float().cpu()
    return torch.stack(out)  # type: ignore[arg-type]


def compute_refstats(source: str | Sequence[str], feature: nn.Module | str | os.PathLike | None = None, *,
                     batch_size: int = 50, image_key: str = "auto", save_features: bool = True,
                     max_images: int | None = None, device: str | torch.device | None = None,
                     progress: bool = True) -> RefStats:
    """Run the feature extractor over ``source`` and return :class:`RefStats`.

    ``feature``: an ``nn.Module``, or a path to the Inception weights / ``None`` (→ :func:`inception_from_local`).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if feature is None or isinstance(feature, (str, os.PathLike)):
        feature = inception_from_local(feature)
    feature = feature.to(dev).eval()
    total = _count(source)
    if max_images is not None:
        total = min(total, max_images) if total is not None else max_images

    def limited() -> Iterator[Tensor]:
        for i, im in enumerate(iter_images(source, image_key)):
            if max_images is not None and i >= max_images:
                return
            yield im

    s = None
    cov = None
    n = 0
    kept: list[Tensor] = []
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]refstats"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress, transient=False) as bar:
        task = bar.add_task("images", total=total)
        for batch in _batches(limited(), batch_size):
            f = _extract(feature, batch, dev).double()
            s = f.sum(0) if s is None else s + f.sum(0)
            cov = f.t() @ f if cov is None else cov + f.t() @ f
            n += f.shape[0]
            if save_features:
                kept.append(f.float())
            bar.update(task, advance=len(batch))
    if n < 2:
        raise ValueError(f"need at least 2 images for reference statistics, found {n} in {source!r}")
    mu = s / n
    sigma = (cov - n * torch.outer(mu, mu)) / (n - 1)
    meta = {"source": str(source) if isinstance(source, (str, os.PathLike)) else list(map(str, source)),
            "extractor": type(feature).__name__, "num_features": int(mu.numel()), "image_key": image_key}
    return RefStats(mu=mu.numpy(), sigma=sigma.numpy(),
                    features=torch.cat(kept).numpy() if save_features else None, num_samples=n, meta=meta)


def refstats_cli(source: str | Sequence[str], out: str | os.PathLike,
                 inception: nn.Module | str | os.PathLike | None = None, batch_size: int = 50,
                 image_key: str = "auto", save_features: bool = True, max_images: int | None = None,
                 device: str | None = None) -> Path:
    """``ctrlgen data refstats``: compute statistics of ``source`` and save them to ``out`` (.npz).

    ``inception``: path to ``weights-inception-2015-12-05-6726825d.pth`` (default: ``$FID_INCEPTION_WEIGHTS`` or
    ``$TORCH_HOME/hub/checkpoints/``) or a ready ``nn.Module``.
    """
    stats = compute_refstats(source, inception, batch_size=batch_size, image_key=image_key,
                             save_features=save_features, max_images=max_images, device=device)
    path = stats.save(out)
    print(f"refstats: {stats.num_samples} images, {stats.mu.shape[0]}-d features"
          f"{' (+features for P/R)' if stats.features is not None else ''} -> {path}")
    return path


class FIDFromStats(GenerativeMetrics):
    """FID (and P/R when the stats hold features, IS if asked) of generated images against saved reference stats.

    ``update(fake_imgs)`` (``real`` must be False or omitted); ``compute()`` → dict as :class:`GenerativeMetrics`.
    """

    def __init__(self, stats: RefStats | str | os.PathLike, feature: nn.Module | None = None, *,
                 compute_pr: bool | None = None, **kwargs: Any) -> None:
        ref = stats if isinstance(stats, RefStats) else load_refstats(stats)
        if compute_pr is None:
            compute_pr = ref.features is not None
        super().__init__(feature, reference=ref, compute_pr=compute_pr, **kwargs)

    def update(self, imgs: Tensor, real: bool = False) -> None:  # type: ignore[override]
        super().update(imgs, real=real)
