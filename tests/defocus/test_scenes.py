"""The ``scenes`` world: deterministic, metric depth, subject mask, camera record, photos by the gather reference."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from ctrlgen.datamodules.shards import iter_samples
from ctrlgen.datamodules.synth import WORLDS, synth
from ctrlgen.lightning_modules.defocus import world as scenes
from ctrlgen.lightning_modules.defocus import GatherReference, LayeredThinLens
from ctrlgen.lightning_modules.defocus.exif import dof_split
from PIL import Image



def test_deterministic_per_seed_split_index():
    a = list(scenes.samples(3, "train", 2, size=32))
    b = list(scenes.samples(3, "train", 2, size=32))
    assert [s["jpg"] for s in a] == [s["jpg"] for s in b] and [s["photo.jpg"] for s in a] == [s["photo.jpg"] for s in b]
    assert all(np.array_equal(x["depth.npy"], y["depth.npy"]) for x, y in zip(a, b, strict=True))
    assert a[0]["jpg"] != a[1]["jpg"]
    assert next(scenes.samples(4, "train", 1, size=32))["jpg"] != a[0]["jpg"]
    assert next(scenes.samples(3, "val", 1, size=32))["jpg"] != a[0]["jpg"]


def test_scene_content_and_camera_record():
    for i in range(12):
        s = scenes.render(0, "train", i, size=48)
        img, depth, mask, meta = s["image"], s["depth"], s["mask"], s["meta"]
        assert img.shape == (48, 48, 3) and depth.shape == (48, 48) and mask.shape == (48, 48)
        assert 0.05 < depth.min() and depth.max() <= 40.0 and mask.sum() > 20
        assert meta["subject_depth_m"] == pytest.approx(float(np.median(depth[mask])))
        assert meta["focus_m"] == meta["subject_depth_m"]
        assert depth[mask].max() < np.median(depth[~mask])  # the subject is in front of most of the scene
        assert meta["dof"] == dof_split(meta["fnumber"], meta["focal35_mm"])
        assert (meta["width"], meta["height"], meta["world"]) == (48, 48, "scenes")
        assert meta["lens"]["renderer"] == "gather"


def test_photo_is_the_gather_reference_render():
    s = scenes.render(0, "train", 2, size=32)
    cam = s["camera"]
    x = torch.from_numpy(s["image"].transpose(2, 0, 1).copy())[None]
    d = torch.from_numpy(s["depth"].copy())[None, None]
    ref = GatherReference().render(x, d, cam["fnumber"], cam["focal35_mm"], cam["focus_m"])[0].permute(1, 2, 0)
    assert np.allclose(s["photo"], ref.numpy(), atol=1e-12)
    layered = LayeredThinLens().render(x, d, cam["fnumber"], cam["focal35_mm"], cam["focus_m"])[0].permute(1, 2, 0)
    assert not np.allclose(s["photo"], layered.numpy(), atol=1e-6)  # a different implementation


def test_shallow_photos_blur_the_background_and_keep_the_subject():
    shallow, deep = [], []
    for i in range(24):
        s = scenes.render(1, "train", i, size=64)
        bg = ~s["mask"] & (s["depth"] > 3 * s["meta"]["focus_m"])
        if bg.sum() < 50:
            continue
        diff = np.abs(s["photo"] - s["image"]).mean(-1)
        core = s["mask"] & (np.abs(s["depth"] - s["meta"]["focus_m"]) < 0.01 * s["meta"]["focus_m"])
        (shallow if s["meta"]["dof"] == "shallow" else deep).append((diff[bg].mean(), diff[core].mean()))
    assert len(shallow) >= 4 and len(deep) >= 4
    assert np.median([b for b, _ in shallow]) > 3 * np.median([b for b, _ in deep])
    assert max(c for _, c in shallow + deep) < max(b for b, _ in shallow)  # in-focus subject stays sharp


def test_synth_writes_scenes_shards(tmp_path):
    assert "scenes" in WORLDS
    out = synth("scenes", tmp_path, n_train=3, n_val=2, n_test=0, size=32)
    assert set(out) == {"train", "val"}
    got = list(iter_samples(out["train"][0]))
    assert len(got) == 3
    s = got[0]
    assert {"jpg", "depth.npy", "mask.png", "photo.jpg", "json"} <= set(s)
    depth = np.load(io.BytesIO(s["depth.npy"]))
    assert depth.dtype == np.float32 and depth.shape == (32, 32)
    mask = np.asarray(Image.open(io.BytesIO(s["mask.png"])))
    assert set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    with pytest.raises(ValueError, match="scenes"):
        synth("nope", tmp_path)
