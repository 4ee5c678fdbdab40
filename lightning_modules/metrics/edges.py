"""Edge extractors shared by condition extraction (data) and the Canny-F1 metric.

One registry, one object per name: ``get_edge_extractor("cv2_canny_100_200")`` returns the *same*
:class:`EdgeExtractor` every time, so a data config and a metric config that name the same entry
resolve to one extractor (ecm.md §6: one detector setting for both extraction and metric).

Fixed convention of the ``cv2_canny_<low>_<high>`` family (ControlNet / CAR: ``cv2.Canny(img, 100, 200)``):
RGB → grayscale with ``cv2.COLOR_RGB2GRAY`` (not cv2's per-channel-max colour Canny), then
``cv2.Canny(gray, low, high)`` (3×3 Sobel, L1 gradient). Output is binary {0, 255} uint8 (or bool).

Inputs accepted by :meth:`EdgeExtractor.__call__`:

* ``torch.Tensor`` (B,3,H,W) or (3,H,W): uint8 in [0,255], or floating in ``value_range`` (default [0,1]);
  returns a tensor (B,1,H,W) / (1,H,W) on the input's device.
* ``numpy.ndarray`` (H,W,3) or (B,H,W,3): uint8 or floating in ``value_range``; returns (H,W) / (B,H,W)
  (what ``cv2.Canny`` returns).

Dependencies: numpy, torch, cv2 only (the datamodules import this module).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

import cv2
import numpy as np
import torch

__all__ = [
    "DEFAULT_EDGE_EXTRACTOR",
    "CannyEdgeExtractor",
    "EdgeExtractor",
    "available_edge_extractors",
    "get_edge_extractor",
    "register_edge_extractor",
    "to_uint8_numpy_hwc",
]

DEFAULT_EDGE_EXTRACTOR = "cv2_canny_100_200"

ArrayLike = torch.Tensor | np.ndarray


def to_uint8_numpy_hwc(images: ArrayLike, value_range: tuple[float, float] | None = None) -> tuple[np.ndarray, dict]:
    """Convert images to a uint8 numpy batch (B,H,W,3) plus a ``layout`` dict describing the input.

    Floating inputs are mapped from ``value_range`` (default (0, 1)) to [0, 255], rounded and clipped.
    """
    layout: dict = {}
    if isinstance(images, torch.Tensor):
        layout["kind"] = "torch"
        layout["device"] = images.device
        x = images.detach()
        if x.ndim == 3:
            layout["batched"] = False
            x = x.unsqueeze(0)
        elif x.ndim == 4:
            layout["batched"] = True
        else:
            raise ValueError(f"expected a (B,3,H,W) or (3,H,W) tensor, got shape {tuple(images.shape)}")
        if x.shape[1] != 3:
            raise ValueError(f"expected 3 channels in dim 1 (RGB, channels-first), got shape {tuple(images.shape)}")
        x = x.cpu()
        if x.dtype == torch.uint8:
            arr = x.permute(0, 2, 3, 1).contiguous().numpy()
        elif x.is_floating_point():
            lo, hi = value_range if value_range is not None else (0.0, 1.0)
            x = (x.float() - lo) / (hi - lo) * 255.0
            arr = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        else:
            raise TypeError(f"unsupported image dtype {x.dtype}; use uint8 or a floating dtype")
        return arr, layout
    if isinstance(images, np.ndarray):
        layout["kind"] = "numpy"
        x = images
        if x.ndim == 3:
            layout["batched"] = False
            x = x[None]
        elif x.ndim == 4:
            layout["batched"] = True
        else:
            raise ValueError(f"expected an (H,W,3) or (B,H,W,3) array, got shape {images.shape}")
        if x.shape[-1] != 3:
            raise ValueError(f"expected 3 channels last (RGB, HWC), got shape {images.shape}")
        if x.dtype == np.uint8:
            arr = x
        elif np.issubdtype(x.dtype, np.floating):
            lo, hi = value_range if value_range is not None else (0.0, 1.0)
            arr = np.clip(np.rint((x.astype(np.float64) - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
        else:
            raise TypeError(f"unsupported image dtype {x.dtype}; use uint8 or a floating dtype")
        return np.ascontiguousarray(arr), layout
    raise TypeError(f"expected torch.Tensor or numpy.ndarray, got {type(images).__name__}")


class EdgeExtractor:
    """Base class: maps RGB images to binary edge maps. Subclasses implement :meth:`extract_uint8`."""

    name: str = "edge_extractor"

    def extract_uint8(self, image_hwc: np.ndarray) -> np.ndarray:
        """One uint8 RGB (H,W,3) image → uint8 (H,W) edge map in {0, 255}."""
        raise NotImplementedError(f"{type(self).__name__} must implement extract_uint8(image_hwc)")

    def __call__(
        self,
        images: ArrayLike,
        *,
        as_bool: bool = False,
        value_range: tuple[float, float] | None = None,
    ) -> ArrayLike:
        arr, layout = to_uint8_numpy_hwc(images, value_range)
        edges = np.stack([self.extract_uint8(np.ascontiguousarray(im)) for im in arr], 0)  # (B,H,W) uint8
        if as_bool:
            edges = edges > 0
        if layout["kind"] == "torch":
            out = torch.from_numpy(edges).unsqueeze(1).to(layout["device"])  # (B,1,H,W)
            return out if layout["batched"] else out[0]
        return edges if layout["batched"] else edges[0]

    # Unpickling inside the same process resolves back to the registry singleton (DataLoader workers get a
    # registry-resolved object in their own process, which is equally "the" extractor there).
    def __reduce_ex__(self, protocol):
        if _REGISTRY_INSTANCES.get(self.name) is self:
            return (get_edge_extractor, (self.name,))
        return super().__reduce_ex__(protocol)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class CannyEdgeExtractor(EdgeExtractor):
    """``cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), low, high)``; output {0,255} uint8."""

    def __init__(self, low: float = 100, high: float = 200, *, aperture_size: int = 3, l2_gradient: bool = False,
                 name: str | None = None) -> None:
        self.low = float(low)
        self.high = float(high)
        self.aperture_size = int(aperture_size)
        self.l2_gradient = bool(l2_gradient)
        self.name = name or f"cv2_canny_{low:g}_{high:g}"

    def extract_uint8(self, image_hwc: np.ndarray) -> np.ndarray:
        gray = cv2.cvtColor(image_hwc, cv2.COLOR_RGB2GRAY)
        return cv2.Canny(gray, self.low, self.high, apertureSize=self.aperture_size, L2gradient=self.l2_gradient)


_REGISTRY_FACTORIES: dict[str, Callable[[], EdgeExtractor]] = {}
_REGISTRY_INSTANCES: dict[str, EdgeExtractor] = {}
_LOCK = threading.Lock()
_CANNY_RE = re.compile(r"^cv2_canny_(\d+(?:\.\d+)?)_(\d+(?:\.\d+)?)$")


def register_edge_extractor(name: str, factory: Callable[[], EdgeExtractor], *, overwrite: bool = False) -> None:
    """Register ``factory`` (called once, lazily) under ``name``."""
    with _LOCK:
        if name in _REGISTRY_FACTORIES and not overwrite:
            raise KeyError(f"edge extractor {name!r} is already registered")
        _REGISTRY_FACTORIES[name] = factory
        _REGISTRY_INSTANCES.pop(name, None)


def get_edge_extractor(name: str | EdgeExtractor = DEFAULT_EDGE_EXTRACTOR) -> EdgeExtractor:
    """The registry's single instance for ``name`` (an :class:`EdgeExtractor` passes through unchanged).

    Any ``cv2_canny_<low>_<high>`` name is accepted (registered on first use) besides explicit registrations.
    """
    if isinstance(name, EdgeExtractor):
        return name
    if not isinstance(name, str):
        raise TypeError(f"edge extractor must be a registry name or an EdgeExtractor, got {type(name).__name__}")
    with _LOCK:
        inst = _REGISTRY_INSTANCES.get(name)
        if inst is not None:
            return inst
        factory = _REGISTRY_FACTORIES.get(name)
        if factory is None:
            m = _CANNY_RE.match(name)
            if m is None:
                raise KeyError(
                    f"unknown edge extractor {name!r}; registered: {sorted(_REGISTRY_FACTORIES)} "
                    "(or any 'cv2_canny_<low>_<high>')"
                )
            lo, hi = float(m.group(1)), float(m.group(2))
            factory = lambda lo=lo, hi=hi, name=name: CannyEdgeExtractor(lo, hi, name=name)
            _REGISTRY_FACTORIES[name] = factory
        inst = factory()
        inst.name = name
        _REGISTRY_INSTANCES[name] = inst
        return inst


def available_edge_extractors() -> list[str]:
    return sorted(_REGISTRY_FACTORIES)


register_edge_extractor(DEFAULT_EDGE_EXTRACTOR, lambda: CannyEdgeExtractor(100, 200, name=DEFAULT_EDGE_EXTRACTOR))
