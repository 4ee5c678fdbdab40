"""``ctrlgen data tokenize``: add pre-computed VQ codes (``vq.npy``) to image shards (ecm.md §5, platform.md §3).

Every sample of the input shards is resized (shorter side → ``mid_reso`` × the VQVAE's ``image_size``; VAR's 1.125 by
default, the crop ``ECMDataModule`` evaluates on) and centre-cropped with
:func:`ctrlgen.datamodules.images.resize_crop`, the function the ECM loader uses, applied to the image **and** every
image-typed key (``canny.png``, ``depth.png``, ``normal.png``, …) alike, so condition maps and codes describe the same
crop. The crop is re-encoded (JPEG stays JPEG at ``jpeg_quality``, condition maps stay lossless PNG, 16-bit PNGs stay
16-bit) and the codes are computed from the **decoded re-encoded** image, i.e. from exactly the pixels
``ECMDataModule(pretokenized=True)`` will see. With ``mid_reso`` 1, samples already at the right size keep their
original bytes untouched. ``vq.npy`` holds the L codes in VAR order (scale 0 first), uint16 (int32 if the vocabulary
exceeds 65,536). All other keys are copied byte for byte.

``crops_per_image`` N > 1 (ecm.md §5's knob) also stores N − 1 random crops of the same resized image (VAR's
training crop), each with its maps and codes under the prefix ``c<j>.`` (``c1.jpg``, ``c1.canny.png``, ``c1.vq.npy``;
crop j of a sample is the same on every run: its position is seeded by the sample key and j). The unprefixed keys stay
the centre crop, so evaluation and N = 1 readers see what they saw before; ``ECMDataModule(pretokenized=True)`` picks
one stored crop per sample and epoch in training (lazy decoding: the others cost nothing).

Output: one output shard per input shard (sample order kept, so equal-sized eval shards stay equal-sized), named
``out % i`` when ``out`` contains ``%`` (``i`` = index of the input shard), else ``out/<input basename>``. Shards are
written to ``*.tmp`` and renamed when complete. A ``tokenize.json`` with the provenance (VQVAE preset, weights file and
sha256, L, dtype, counts) is written next to them. Corrupt samples (undecodable image, mismatched map sizes, missing
image) and unreadable tar members are skipped and counted by reason; a summary is printed.

Decoding / cropping / re-encoding run in ``num_workers`` DataLoader workers (whole shards per worker), the VQVAE runs in
the main process on the GPU if available, in fp32 with TF32 off (codes reproducible; ``precision="bf16"`` is faster).
"""

from __future__ import annotations

import io
import json
import os
import random
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
_PIL_FORMAT = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}


# ------------------------------------------------------------------------------------------------------------- config
def vqvae_args_from_config(config: str | os.PathLike | dict) -> dict[str, Any]:
    """``preset``/``overrides``/``weights`` of the VQVAE named by a ctrlgen config: the ``model.init_args`` of a
    VQVAEModule (``preset``, ``vqvae_overrides``, ``weights``) or VARModule/ECMModule (``vqvae_preset``,
    ``vqvae_overrides``, ``vqvae_weights``). Also accepts a bare ``init_args`` mapping."""
    cfg = config if isinstance(config, dict) else yaml.safe_load(Path(config).read_text()) or {}
    model = cfg.get("model", cfg)
    init = model.get("init_args", model) if isinstance(model, dict) else {}
    class_path = str(model.get("class_path", "")) if isinstance(model, dict) else ""
    is_vqvae_module = class_path.endswith("VQVAEModule") or ("preset" in init and "vqvae_preset" not in init)
    if is_vqvae_module:
        preset, weights = init.get("preset", "vae_ch160v4096z32"), init.get("weights")
    else:
        preset, weights = init.get("vqvae_preset", "vae_ch160v4096z32"), init.get("vqvae_weights")
    return {"preset": preset, "overrides": init.get("vqvae_overrides") or None, "weights": weights,
            "class_path": class_path or None}


def build_tokenizer(config: str | os.PathLike | dict, ckpt: str | None = None, allow_random: bool = False):
    """(VQVAE in eval mode, provenance dict) from a config; ``ckpt`` overrides the config's weights path."""
    from ctrlgen.lightning_modules.ecm.bases import make_vqvae

    args = vqvae_args_from_config(config)
    weights = ckpt or args["weights"]
    if not weights and not allow_random:
        raise ValueError(f"tokenize: no VQVAE weights: pass --ckpt or set the config's weights/vqvae_weights "
                         f"(config {config if not isinstance(config, dict) else '<dict>'}); codes of a random VQVAE are useless")
    vq, info = make_vqvae(args["preset"], args["overrides"], weights)
    return vq.eval().requires_grad_(False), {**args, "weights": weights, "weights_info": info}


# ---------------------------------------------------------------------------------------------------- per-sample work
def _ext(key: str) -> str:
    return key.rsplit(".", 1)[-1].lower()


def _decode_map(data: bytes) -> np.ndarray:
    """Image-typed key → array keeping what matters: L (uint8 HW), 16-bit (uint16 HW), RGBA, else RGB."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            return np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
        if im.mode in ("L", "1"):
            return np.asarray(im.convert("L"))
        alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
        return np.asarray(im.convert("RGBA" if alpha else "RGB"))


def _encode(arr: np.ndarray, ext: str, jpeg_quality: int) -> bytes:
    buf = io.BytesIO()
    fmt = _PIL_FORMAT[ext]
    img = Image.fromarray(np.ascontiguousarray(arr))
    if fmt == "JPEG":
        img.save(buf, format=fmt, quality=jpeg_quality)
    elif fmt == "WEBP":
        img.save(buf, format=fmt, lossless=True)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


def find_image_key(sample: dict[str, Any], image_key: str = "auto") -> str:
    if image_key != "auto":
        if image_key not in sample:
            raise KeyError(f"sample {sample.get('__key__')!r} has no image key {image_key!r}")
        return image_key
    for k in IMAGE_KEYS:
        if k in sample:
            return k
    keys = sorted(k for k in sample if not k.startswith("__"))
    raise KeyError(f"sample {sample.get('__key__')!r} has no image ({'/'.join(IMAGE_KEYS)}); keys {keys}")


def prepare_sample(raw: dict[str, Any], size: int, image_key: str = "auto", jpeg_quality: int = 95,
                   mid_reso: float = 1.125) -> tuple[dict[str, Any], np.ndarray]:
    """Raw sample (bytes per key) → (output sample without ``vq.npy``, uint8 HWC pixels to tokenise). Raises on a
    corrupt sample. Image-typed keys share one resize (shorter side → ``mid_reso`` × size) + centre crop: the crop
    ``ECMDataModule`` evaluates on; untouched when ``mid_reso`` is 1 and the image is already ``size``×``size``."""
    out, pixels = prepare_crops(raw, size, image_key, jpeg_quality, mid_reso, crops=1)
    return out, pixels[0]


def prepare_crops(raw: dict[str, Any], size: int, image_key: str = "auto", jpeg_quality: int = 95,
                  mid_reso: float = 1.125, crops: int = 1) -> tuple[dict[str, Any], list[np.ndarray]]:
    """``prepare_sample``'s centre crop (crop 0, unprefixed keys) plus ``crops`` − 1 random crops stored under
    ``c<j>.`` keys; (output sample without codes, the pixels to tokenise per crop). The image and its maps are decoded
    once for all crops. Stale ``c<j>.`` and ``vq.npy`` keys of the input are dropped."""
    from ctrlgen.datamodules.images import CROP_KEY, crop_prefix, resize_crop
    from ctrlgen.datamodules.shards import decode_image

    ikey = find_image_key(raw, image_key)
    img = decode_image(raw[ikey], "RGB")
    out = {k: v for k, v in raw.items() if not k.startswith("__") and k != "vq.npy" and not CROP_KEY.match(k)}
    out["__key__"] = raw["__key__"]
    keep = img.shape[:2] == (size, size) and mid_reso == 1.0  # crop 0 is the image as stored: original bytes kept
    map_keys = [k for k in out if k not in ("__key__", ikey) and _ext(k) in _IMAGE_EXTS]
    maps = [] if keep and crops == 1 else [_decode_map(raw[k]) for k in map_keys]
    pixels = [img] if keep else []
    for j in range(len(pixels), crops):
        # crop 0: the loader's centre crop; j ≥ 1: VAR's random training crop, fixed per (key, j)
        rng = random.Random(zlib.crc32(f"{raw['__key__']}|crop{j}".encode())) if j else None
        cropped = resize_crop([img, *maps], size, rng, mid_reso)
        out[crop_prefix(j) + ikey] = _encode(cropped[0], _ext(ikey), jpeg_quality)
        for k, a in zip(map_keys, cropped[1:]):
            out[crop_prefix(j) + k] = _encode(a, _ext(k), jpeg_quality)
        pixels.append(decode_image(out[crop_prefix(j) + ikey], "RGB"))  # what the loader decodes from the bytes
    return out, pixels


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def codes_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


# ---------------------------------------------------------------------------------------------------- shard reading
class _ShardReader(IterableDataset):
    """Whole shards per worker; yields ("s", shard, sample, pixels per crop) and one ("e", shard, skip counts) per
    shard."""

    def __init__(self, urls: Sequence[str], size: int, image_key: str, jpeg_quality: int, mid_reso: float,
                 crops: int = 1):
        self.urls, self.size, self.image_key, self.jpeg_quality = list(urls), size, image_key, jpeg_quality
        self.mid_reso, self.crops = mid_reso, crops

    def __iter__(self) -> Iterator[tuple]:
        from ctrlgen.datamodules.shards import iter_samples

        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(wid, len(self.urls), nw):
            skips: Counter[str] = Counter()
            examples: dict[str, str] = {}

            def handler(exn: BaseException, skips=skips, examples=examples) -> bool:
                name = type(exn).__name__
                skips[f"tar:{name}"] += 1
                examples.setdefault(f"tar:{name}", str(exn)[:200])
                return True

            for raw in iter_samples(self.urls[i], handler=handler):
                try:
                    sample, pixels = prepare_crops(raw, self.size, self.image_key, self.jpeg_quality, self.mid_reso,
                                                   self.crops)
                except Exception as e:  # noqa: BLE001 - any failure makes the sample unusable: skip and count
                    skips[type(e).__name__] += 1
                    examples.setdefault(type(e).__name__, f"{raw.get('__key__')}: {str(e)[:200]}")
                    continue
                yield ("s", i, sample, pixels)
            yield ("e", i, dict(skips), examples)


def _identity(x):
    return x


def output_paths(urls: Sequence[str], out: str) -> list[str]:
    if "%" in out:
        paths = [out % i for i in range(len(urls))]
    else:
        paths = [str(Path(out) / Path(u.split("::")[-1].rstrip("/")).name) for u in urls]
    if len(set(paths)) != len(paths):
        raise ValueError(f"tokenize: output names collide for --out {out!r} (inputs share basenames); use a pattern "
                         "with %06d")
    inputs = {os.path.abspath(u.removeprefix("file:")) for u in urls}
    clash = [p for p in paths if os.path.abspath(p) in inputs]
    if clash:
        raise ValueError(f"tokenize: refusing to overwrite input shard {clash[0]!r}; choose another --out")
    return paths


# ------------------------------------------------------------------------------------------------------------- main
def tokenize_cli(shards: str | Sequence[str], out: str, config: str | os.PathLike | dict, ckpt: str | None = None,
                 batch_size: int = 64, *, num_workers: int | None = None, image_key: str = "auto",
                 jpeg_quality: int = 95, device: str | None = None, precision: str = "fp32",
                 allow_random: bool = False, progress: bool = True, mid_reso: float = 1.125,
                 crops_per_image: int = 1) -> dict[str, Any]:
    """Tokenise ``shards`` into new shards under ``out`` (see module docstring); returns the summary dict.
    ``mid_reso``: as ``ECMDataModule``'s (VAR: 1.125); 1.0 for shards already cropped to the VQVAE's size.
    ``crops_per_image``: stored crops per sample (the centre crop + N − 1 random ones); ``batch_size`` counts
    samples, so the VQVAE sees up to ``batch_size × crops_per_image`` images at once."""
    from webdataset import TarWriter

    from ctrlgen.datamodules.images import check_mid_reso
    from ctrlgen.datamodules.shards import resolve_shards

    t0 = time.perf_counter()
    urls = resolve_shards(shards, "tokenize --shards")
    paths = output_paths(urls, str(out))
    vq, prov = build_tokenizer(config, ckpt, allow_random)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vq.to(dev)
    if precision not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"precision must be fp32|tf32|bf16, got {precision!r}")
    size, L, dtype = vq.image_size, sum(p * p for p in vq.patch_nums), codes_dtype(vq.vocab_size)
    if num_workers is None:
        num_workers = max(0, min(len(urls), (os.cpu_count() or 1) - 1, 8))
    check_mid_reso(mid_reso, "tokenize: mid_reso")
    if int(crops_per_image) < 1:
        raise ValueError(f"tokenize: crops_per_image must be >= 1, got {crops_per_image}")
    loader = DataLoader(_ShardReader(urls, size, image_key, jpeg_quality, mid_reso, int(crops_per_image)),
                        batch_size=None,
                        num_workers=num_workers, collate_fn=_identity)

    writers: dict[int, tuple[Any, Any, str]] = {}
    pending: list[tuple[int, dict, list[np.ndarray]]] = []
    per_shard: dict[int, int] = Counter()
    skips: Counter[str] = Counter()
    examples: dict[str, str] = {}
    n_done = 0

    def writer(i: int):
        if i not in writers:
            Path(paths[i]).parent.mkdir(parents=True, exist_ok=True)
            tmp = paths[i] + ".tmp"
            fh = open(tmp, "wb")  # noqa: SIM115 - closed (and renamed) when the shard's end marker arrives
            writers[i] = (TarWriter(fh), fh, tmp)
        return writers[i][0]

    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)

    @torch.no_grad()
    def flush() -> None:
        nonlocal n_done
        if not pending:
            return
        # = ctrlgen.datamodules.images.to_signed + collate: contiguous NCHW (a channels-last view picks other conv
        # kernels on CPU, whose rounding flips near-tie codes against the loader's on-the-fly path)
        x = torch.from_numpy(np.stack([p for _, _, ps in pending for p in ps])).to(dev).permute(0, 3, 1, 2).contiguous()
        x = x.float() / 127.5 - 1.0
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            codes = torch.cat(vq.img_to_idx(x), 1)
        codes = codes.cpu().numpy()
        if codes.shape[1] != L or codes.max(initial=0) >= vq.vocab_size:
            raise RuntimeError(f"tokenize: unexpected codes {codes.shape} (L {L}, V {vq.vocab_size})")
        row = 0
        from ctrlgen.datamodules.images import crop_prefix

        for i, sample, ps in pending:
            for j in range(len(ps)):
                sample[crop_prefix(j) + "vq.npy"] = _npy_bytes(codes[row].astype(dtype))
                row += 1
            writer(i).write(sample)
            per_shard[i] += 1
        n_done += len(pending)
        pending.clear()

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("[bold]tokenize[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("shards"), TimeElapsedColumn(), TimeRemainingColumn(), disable=not progress)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
        t_loop = time.perf_counter()
        with bar:
            task = bar.add_task("0 samples", total=len(urls))
            for item in loader:
                if item[0] == "s":
                    pending.append((item[1], item[2], item[3]))
                    if len(pending) >= batch_size:
                        flush()
                        rate = n_done / max(time.perf_counter() - t_loop, 1e-9)
                        bar.update(task, description=f"{n_done:,} samples ({rate:.1f} img/s), {sum(skips.values())} skipped")
                    continue
                _, i, sk, ex = item
                flush()  # every sample of shard i has arrived (per-worker order is kept)
                w, fh, tmp = writers.pop(i) if i in writers else (None, None, None)
                if w is None:  # nothing valid in this shard: still write an (empty) output shard
                    writer(i)
                    w, fh, tmp = writers.pop(i)
                w.close()
                fh.close()
                os.replace(tmp, paths[i])
                skips.update(sk)
                for k, v in ex.items():
                    examples.setdefault(k, v)
                bar.update(task, advance=1,
                           description=f"{n_done:,} samples, {sum(skips.values())} skipped")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for w, fh, tmp in writers.values():  # interrupted: leave no half-written shard under the final name
            fh.close()
            Path(tmp).unlink(missing_ok=True)

    elapsed, loop_s = time.perf_counter() - t0, time.perf_counter() - t_loop
    summary = {
        "shards_in": len(urls), "shards_out": paths, "samples": n_done, "skipped": sum(skips.values()),
        "skipped_by_reason": dict(skips), "skip_examples": examples, "codes_per_sample": L, "codes_dtype": dtype.name,
        "image_size": size, "mid_reso": mid_reso, "crops_per_image": int(crops_per_image),
        "vqvae_preset": prov["preset"], "vqvae_overrides": prov["overrides"],
        "weights": prov["weights"], "weights_sha256": (prov["weights_info"] or {}).get("sha256"),
        "device": str(dev), "precision": precision, "num_workers": num_workers, "seconds": round(elapsed, 3),
        "img_per_s": round(n_done / max(loop_s, 1e-9), 2), "samples_per_shard": [per_shard[i] for i in range(len(urls))],
    }
    meta_dir = Path(paths[0]).parent
    (meta_dir / "tokenize.json").write_text(json.dumps(summary, indent=1))
    print(f"tokenize: {n_done:,} samples -> {len(paths)} shards in {meta_dir} ({L} codes/sample as {dtype.name} "
          f"vq.npy, {size}px centre crop of {max(size, round(size * mid_reso))}px"
          + (f" + {crops_per_image - 1} random crop(s)" if crops_per_image > 1 else "")
          + f", VQVAE {prov['preset']} from {prov['weights']}), {elapsed:.1f} s "
          f"({summary['img_per_s']:.1f} img/s on {dev}, {precision}, {num_workers} reader worker(s))")
    if skips:
        print(f"tokenize: skipped {sum(skips.values())} corrupt sample(s): "
              + ", ".join(f"{k} x{v}" for k, v in sorted(skips.items())))
        for k, v in examples.items():
            print(f"  e.g. {k}: {v}")
    else:
        print("tokenize: skipped 0 samples")
    return summary
