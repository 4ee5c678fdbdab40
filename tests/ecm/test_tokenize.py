"""``ctrlgen data tokenize`` (lightning_modules/apps/tokenize.py; ecm.md §5): codes = img_to_idx of the stored crop,
pretokenised batches carry ``codes`` (B, L), and the training loss on pretokenised batches equals the loss with
on-the-fly tokenisation of the same crop (VARModule and ECMModule)."""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ctrlgen.datamodules.ecm import ECMDataModule
from ctrlgen.datamodules.images import resize_crop, to_signed
from ctrlgen.datamodules.shards import (
    decode_image,
    encode_jpg,
    encode_png,
    iter_samples,
    write_shards,
)
from ctrlgen.lightning_modules.apps.tokenize import tokenize_cli, vqvae_args_from_config
from ctrlgen.lightning_modules.ecm.vqvae import build_vqvae

SIZE, N_PER_SHARD = 32, 8
L_TINY = 1 + 4 + 9 + 16 + 36 + 64  # TINY_PATCH_NUMS (1, 2, 3, 4, 6, 8)
CONTROL = {"patch": 4, "width": 32, "vit_depth": 1, "vit_heads": 2, "every": 2, "offset": 1, "cond_drop_rate": 0.0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """demo32 VQVAE saved as a VQVAEModule-style .ckpt, 2 shapes shards + 1 shard of non-square/corrupt samples,
    tokenised once."""
    from ctrlgen.datamodules.synth import synth

    d = tmp_path_factory.mktemp("tok")
    synth("shapes", d / "src", n_train=2 * N_PER_SHARD, n_val=0, n_test=0, size=SIZE, shard_size=N_PER_SHARD)
    # shard 2: non-square images (crop + map crop), one corrupt jpg, one map of the wrong size
    rng = np.random.default_rng(0)
    odd = []
    for i in range(4):
        img = rng.integers(0, 256, (SIZE, SIZE + 16, 3), dtype=np.uint8)
        canny = (rng.random((SIZE, SIZE + 16)) > 0.8).astype(np.uint8) * 255
        odd.append({"__key__": f"odd_{i}", "jpg": encode_jpg(img), "cls": i % 4, "canny.png": encode_png(canny),
                    "json": {"i": i}})
    odd.append({"__key__": "bad_jpg", "jpg": b"not a jpeg", "cls": 0, "canny.png": encode_png(canny)})
    odd.append({"__key__": "bad_map", "jpg": encode_jpg(img), "cls": 0, "canny.png": encode_png(canny[:8])})
    (written,) = write_shards(odd, str(d / "odd-%06d.tar"), maxcount=100)
    Path(written).rename(d / "src" / "train-000002.tar")

    torch.manual_seed(0)
    vq = build_vqvae("demo32")
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()  # spread codebook → varied codes from a random encoder
    ckpt = d / "vqvae.ckpt"
    torch.save({"state_dict": {f"vqvae.{k}": v for k, v in vq.state_dict().items()}}, ckpt)
    cfg = d / "vq.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"class_path": "ctrlgen.lightning_modules.ecm.VQVAEModule",
                                             "init_args": {"preset": "demo32"}}}))
    summary = tokenize_cli(str(d / "src" / "train-{000000..000002}.tar"), str(d / "out"), str(cfg), str(ckpt),
                           batch_size=N_PER_SHARD, num_workers=0, progress=False, mid_reso=1.0)
    return {"dir": d, "vq": vq.eval(), "ckpt": str(ckpt), "summary": summary,
            "out": str(d / "out" / "train-{000000..000001}.tar")}


def _samples(path):
    return list(iter_samples(str(path)))


def test_codes_equal_img_to_idx_of_the_stored_crop(setup):
    d, vq, s = setup["dir"], setup["vq"], setup["summary"]
    assert s["samples"] == 2 * N_PER_SHARD + 4 and s["skipped"] == 2
    assert s["samples_per_shard"] == [N_PER_SHARD, N_PER_SHARD, 4]
    assert set(s["skipped_by_reason"]) == {"UnidentifiedImageError", "ValueError"}
    assert json.loads((d / "out" / "tokenize.json").read_text())["codes_dtype"] == "uint16"
    for k in range(3):
        src, out = _samples(d / "src" / f"train-{k:06d}.tar"), _samples(d / "out" / f"train-{k:06d}.tar")
        src = {r["__key__"]: r for r in src}
        pix = np.stack([decode_image(r["jpg"]) for r in out])
        assert pix.shape[1:] == (SIZE, SIZE, 3)
        ref = torch.cat(vq.img_to_idx(torch.from_numpy(np.stack([to_signed(p) for p in pix]))), 1)
        codes = np.stack([np.load(io.BytesIO(r["vq.npy"])) for r in out])
        assert codes.dtype == np.uint16 and codes.shape == (len(out), L_TINY)
        assert torch.equal(torch.from_numpy(codes.astype(np.int64)), ref)
        assert len(np.unique(codes)) > 20
        for r in out:
            orig = src[r["__key__"]]
            assert set(orig) - {"__url__", "__local_path__"} <= set(r) and "vq.npy" in r
            for key in ("cls", "json", "depth.png", "normal.png"):
                if key in orig:
                    assert r[key] == orig[key]  # non-image keys and untouched samples: byte-identical
            if k < 2:  # already 32 px: original bytes kept
                assert r["jpg"] == orig["jpg"] and r["canny.png"] == orig["canny.png"]
            else:  # cropped: the canny map is the same centre crop of the original map
                canny = np.asarray(Image.open(io.BytesIO(orig["canny.png"])))
                img = decode_image(orig["jpg"])
                want = resize_crop([img, canny], SIZE, None, 1.0)[1]
                got = np.asarray(Image.open(io.BytesIO(r["canny.png"])))
                assert got.shape == (SIZE, SIZE) and np.array_equal(got, want)


def test_default_crop_is_vars_centre_crop_of_the_loader():
    """Default mid_reso 1.125 (VAR): the stored crop is the centre SIZE crop of the image resized to 1.125 × SIZE on
    its shorter side, exactly what ECMDataModule evaluates on; a SIZE × SIZE image is zoomed too (not kept)."""
    from ctrlgen.lightning_modules.apps.tokenize import prepare_sample

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (SIZE + 8, SIZE + 24, 3), dtype=np.uint8)
    canny = (rng.random(img.shape[:2]) > 0.8).astype(np.uint8) * 255
    raw = {"__key__": "k", "png": encode_png(img), "canny.png": encode_png(canny), "cls": b"1"}
    out, pixels = prepare_sample(raw, SIZE, "auto", 95)
    want_img, want_map = resize_crop([img, canny], SIZE, None, 1.125)
    assert np.array_equal(pixels, want_img) and np.array_equal(np.asarray(Image.open(io.BytesIO(out["canny.png"]))),
                                                               want_map)
    assert not np.array_equal(want_map, resize_crop([img, canny], SIZE, None, 1.0)[1])  # the zoom is visible
    dm = ECMDataModule(condition_types=["canny"], resolution=SIZE, batch_size=1, num_workers=0, image_key="png")
    item = dm.to_item({"__key__": "k", "png": img, "canny.png": canny, "cls": 1}, random.Random(0), "test")
    assert np.array_equal(item["image"], to_signed(want_img)) and np.array_equal(item["cond"], to_signed(want_map))
    square = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    raw = {"__key__": "s", "png": encode_png(square), "cls": b"1"}
    assert prepare_sample(raw, SIZE, "auto", 95)[0]["png"] != raw["png"]
    assert prepare_sample(raw, SIZE, "auto", 95, mid_reso=1.0)[0]["png"] == raw["png"]


def test_config_variants():
    assert vqvae_args_from_config({"model": {"class_path": "ctrlgen.lightning_modules.ecm.ECMModule", "init_args": {
        "vqvae_preset": "demo32", "vqvae_weights": "a.ckpt", "var_weights": "b.ckpt"}}})["weights"] == "a.ckpt"
    a = vqvae_args_from_config({"model": {"init_args": {"preset": "tiny", "weights": "v.pth",
                                                        "vqvae_overrides": {"beta": 0.5}}}})
    assert (a["preset"], a["weights"], a["overrides"]) == ("tiny", "v.pth", {"beta": 0.5})
    assert vqvae_args_from_config({"model": {"class_path": "x.VARModule"}})["preset"] == "vae_ch160v4096z32"


def _batches(out, pretokenized):
    dm = ECMDataModule(val_shards=out, pretokenized=pretokenized, resolution=SIZE, batch_size=N_PER_SHARD,
                       num_workers=0, condition_types=["canny"])
    dm.setup("validate")
    return list(dm.val_dataloader())


def _set_eval(module):
    module.eval()
    return module


def test_pretokenized_batches_and_equal_loss(setup):
    from ctrlgen.lightning_modules.ecm import ECMModule, VARModule

    batches = _batches(setup["out"], True)
    assert len(batches) == 2
    for b in batches:
        assert b["codes"].shape == (N_PER_SHARD, L_TINY) and b["codes"].dtype == torch.int64
    common = {"var_preset": "tiny", "vqvae_preset": "demo32", "vqvae_weights": setup["ckpt"],
              "var_overrides": {"cond_drop_rate": 0.0, "embed_dim": 64, "num_heads": 2, "depth": 2}}
    torch.manual_seed(0)
    var_m = _set_eval(VARModule(**common))
    torch.manual_seed(0)
    ecm_m = _set_eval(ECMModule(**common, control=CONTROL, eval_base=False))
    with torch.no_grad():
        ecm_m.control.gates.fill_(0.5)  # control actually changes the logits
        ecm_m.control.gate_in.fill_(0.5)
    b = batches[1]
    fly = {k: v for k, v in b.items() if k != "codes"}
    assert torch.equal(torch.cat(var_m.tokens(fly), 1), b["codes"])
    # the pre-tokenised batch trains from its codes alone: its image is blanked, so a step that re-tokenised the
    # image would see other tokens (the blank image's loss differs: positive control)
    pre_b = {**b, "image": torch.zeros_like(b["image"])} if "image" in b else b
    blank = {**fly, "image": torch.zeros_like(fly["image"])}
    for m in (var_m, ecm_m):
        with torch.no_grad():
            pre, otf = m.model_step(pre_b, "train"), m.model_step(fly, "train")
            assert not torch.equal(m.model_step(blank, "train")["loss"], otf["loss"])
        assert torch.isfinite(pre["loss"]) and torch.equal(pre["loss"], otf["loss"])
    # the controlled loss differs from the uncontrolled one (the control path is live in this check)
    with torch.no_grad():
        ecm_m.control.gates.zero_()
        ecm_m.control.gate_in.zero_()
        base = ecm_m.model_step(b, "train")["loss"]
        assert not torch.equal(base, pre["loss"])


def test_refuses_random_weights_and_overwriting_inputs(setup, tmp_path):
    d = setup["dir"]
    cfg = {"model": {"init_args": {"preset": "demo32"}}}
    with pytest.raises(ValueError, match="no VQVAE weights"):
        tokenize_cli(str(d / "src" / "train-000000.tar"), str(tmp_path / "o"), cfg, None, progress=False, num_workers=0)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        tokenize_cli(str(d / "src" / "train-000000.tar"), str(d / "src"), cfg, setup["ckpt"], progress=False,
                     num_workers=0)


def test_worker_path_and_pattern_output(setup, tmp_path):
    """One DataLoader worker, ``%``-pattern output, another batch size: same codes as the in-process run."""
    d = setup["dir"]
    s = tokenize_cli(str(d / "src" / "train-000001.tar"), str(tmp_path / "p-%03d.tar"),
                     {"model": {"init_args": {"vqvae_preset": "demo32"}}}, setup["ckpt"], batch_size=5,
                     num_workers=1, progress=False, mid_reso=1.0)
    assert s["samples"] == N_PER_SHARD and s["skipped"] == 0
    a, b = _samples(tmp_path / "p-000.tar"), _samples(d / "out" / "train-000001.tar")
    assert [r["__key__"] for r in a] == [r["__key__"] for r in b]
    assert [r["vq.npy"] for r in a] == [r["vq.npy"] for r in b]


def test_pretokenized_shards_must_come_from_the_runs_vqvae(setup, tmp_path):
    """tokenize.json beside the shards records the sha256 of the VQVAE weights that made the codes; a run that trains
    from them with another VQVAE (or a random one) fails at setup naming both (base_mismatch=warn goes on)."""
    from ctrlgen.lightning_modules.ecm import VARModule

    common = {"var_preset": "tiny", "vqvae_preset": "demo32",
              "var_overrides": {"embed_dim": 64, "num_heads": 2, "depth": 2}}
    dm = ECMDataModule(train_shards=setup["out"], resolution=SIZE, batch_size=2, num_workers=0, pretokenized=True)
    VARModule(**common, vqvae_weights=setup["ckpt"]).check_pretokenized(dm)  # the tokeniser's own weights
    other = tmp_path / "other.ckpt"
    torch.manual_seed(5)
    torch.save({"state_dict": {f"vqvae.{k}": v for k, v in build_vqvae("demo32").state_dict().items()}}, other)
    meta = re.escape(str(setup["dir"] / "out" / "tokenize.json"))
    with pytest.raises(ValueError, match=rf"data.init_args.train_shards: {meta} records codes of the VQVAE "
                                         rf"{re.escape(setup['ckpt'])} \(sha256 \w{{12}}…\), but this run's VQVAE is "
                                         rf"{re.escape(str(other))}"):
        VARModule(**common, vqvae_weights=str(other)).check_pretokenized(dm)
    with pytest.raises(ValueError, match=r"but this run's VQVAE is random weights \(no file\)"):
        VARModule(**common).check_pretokenized(dm)
    with pytest.warns(UserWarning, match="tokenise again with it"):
        VARModule(**common, vqvae_weights=str(other), base_mismatch="warn").check_pretokenized(dm)
    on_the_fly = ECMDataModule(train_shards=setup["out"], resolution=SIZE, batch_size=2, num_workers=0)
    VARModule(**common, vqvae_weights=str(other)).check_pretokenized(on_the_fly)  # codes unused: nothing to check


def test_several_stored_crops_and_the_loader_picks_one_per_epoch(setup, tmp_path):
    """--crops-per-image 3: the unprefixed keys are the N = 1 output byte for byte (the centre crop), c1./c2. hold two
    VAR-style random crops (position fixed per key and crop) with their maps and codes = img_to_idx of the stored
    pixels; pre-tokenised training picks one crop per sample and epoch (codes, image and map of the same crop),
    evaluation always the centre crop."""
    import zlib

    from ctrlgen.datamodules.shards import LazySample

    d, vq = setup["dir"], setup["vq"]
    src, cfg = str(d / "src" / "train-000000.tar"), str(d / "vq.yaml")
    kw = dict(batch_size=3, num_workers=0, progress=False, mid_reso=1.5)
    s = tokenize_cli(src, str(tmp_path / "three"), cfg, setup["ckpt"], crops_per_image=3, **kw)
    tokenize_cli(src, str(tmp_path / "one"), cfg, setup["ckpt"], **kw)
    assert s["crops_per_image"] == 3 and s["samples"] == N_PER_SHARD and s["skipped"] == 0
    out, one = _samples(tmp_path / "three" / "train-000000.tar"), _samples(tmp_path / "one" / "train-000000.tar")
    prefixes = ("", "c1.", "c2.")
    for r, b in zip(out, one):
        assert all(r[k] == v for k, v in b.items() if not k.startswith("__"))
        keys = ("jpg", "canny.png", "depth.png", "normal.png", "vq.npy")
        assert {p + k for p in prefixes[1:] for k in keys} <= set(r)
    pix = [decode_image(r[p + "jpg"]) for r in out for p in prefixes]
    ref = torch.cat(vq.img_to_idx(torch.from_numpy(np.stack([to_signed(p) for p in pix]))), 1)
    codes = np.stack([np.load(io.BytesIO(r[p + "vq.npy"])) for r in out for p in prefixes])
    assert torch.equal(torch.from_numpy(codes.astype(np.int64)), ref)
    assert sum(not np.array_equal(pix[3 * i], pix[3 * i + 1]) for i in range(len(out))) >= len(out) // 2
    orig = {r["__key__"]: r for r in _samples(src)}
    for r in out[:3]:  # c2's map is the original map cropped where c2's image was cropped
        o = orig[r["__key__"]]
        rng = random.Random(zlib.crc32(f"{r['__key__']}|crop2".encode()))
        want = resize_crop([decode_image(o["jpg"]), np.asarray(Image.open(io.BytesIO(o["canny.png"])))], SIZE, rng,
                           1.5)[1]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r["c2.canny.png"]))), want)

    dm = ECMDataModule(pretokenized=True, resolution=SIZE, batch_size=1, num_workers=0, condition_types=["canny"])
    raw = out[0]
    crop_codes = [np.load(io.BytesIO(raw[p + "vq.npy"])).astype(np.int64) for p in prefixes]
    crop_maps = [to_signed(np.asarray(Image.open(io.BytesIO(raw[p + "canny.png"])))) for p in prefixes]
    picked = []
    for epoch in range(24):
        item = dm.to_item(LazySample(raw), random.Random(epoch), "train")
        j = next(j for j in range(3) if np.array_equal(item["codes"], crop_codes[j]))
        assert np.array_equal(item["cond"], crop_maps[j])  # the map of the same crop
        assert np.array_equal(item["image"], to_signed(decode_image(raw[prefixes[j] + "jpg"])))
        picked.append(j)
    assert set(picked) == {0, 1, 2}
    for epoch in range(4):
        assert np.array_equal(dm.to_item(LazySample(raw), random.Random(epoch), "val")["codes"], crop_codes[0])
