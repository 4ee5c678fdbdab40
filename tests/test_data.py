"""WebDataset datamodule: decoding, exact eval splits, the packing tool, and fault handling (skips are counted)."""

from __future__ import annotations

import io
import random
import json
import tarfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ctrlgen.datamodules.ecm import ECMDataModule, to_signed
from ctrlgen.datamodules.pack import pack_folder
from ctrlgen.datamodules.shards import SKIPS, decode_value, encode_png, expand_urls, resolve_shards, write_shards
from ctrlgen.datamodules.synth import shapes


def _dm(**kw) -> ECMDataModule:
    base = dict(batch_size=4, num_workers=0, resolution=32, train_batches_per_epoch=3)
    base.update(kw)
    dm = ECMDataModule(**base)
    return dm


def test_png_condition_keeps_one_channel():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert decode_value("canny.png", encode_png(gray)).shape == (8, 8)
    rgb = np.zeros((8, 8, 3), np.uint8)
    assert decode_value("normal.png", encode_png(rgb)).shape == (8, 8, 3)
    assert decode_value("x.json", b'{"a": 1}') == {"a": 1}
    assert decode_value("x.cls", b"3") == 3
    # a 16-bit depth PNG is rescaled to 8 bits (Pillow's convert("L") would clip everything above 255 to white)
    deep = np.array([[0, 1000, 30000, 65535]], dtype=np.uint16)
    got = decode_value("depth.png", encode_png(deep))
    assert got.dtype == np.uint8 and got.tolist() == [[0, 4, 117, 255]]


def test_train_batches_and_shapes(shapes_shards):
    dm = _dm(train_shards=shapes_shards["train"], condition_types=["canny", "depth"])
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    b = batches[0]
    assert b["image"].shape == (4, 3, 32, 32) and b["cond"].shape == (4, 3, 32, 32)
    assert b["image"].min() >= -1 and b["image"].max() <= 1
    assert b["label"].dtype == torch.int64 and set(b["cond_type"].tolist()) <= {0, 1}


def test_stream_is_deterministic_per_epoch(shapes_shards):
    a = [b["key"] for b in _dm(train_shards=shapes_shards["train"]).train_dataloader()]
    dm = _dm(train_shards=shapes_shards["train"])
    loader = dm.train_dataloader()
    assert [b["key"] for b in loader] == a
    assert [b["key"] for b in loader] != a  # the next epoch draws a new order


def test_eval_split_is_exact(shapes_shards):
    dm = _dm(val_shards=shapes_shards["val"], eval_batch_size=5)
    dm.setup("validate")
    keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert len(keys) == 16 and len(set(keys)) == 16


def test_var_style_crop_augments_square_images_in_training():
    """mid_reso 1.125 (the default, VAR's): a square image is enlarged to 1.125× and cropped, so training crops move
    with the seed while evaluation takes the centre; mid_reso 1 crops a square image to itself."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    canny = (rng.random((32, 32)) > 0.8).astype(np.uint8) * 255
    sample = {"__key__": "k", "jpg": img, "cls": 1, "canny.png": canny}
    dm = _dm()
    train = [dm.to_item(dict(sample), random.Random(s), "train")["cond"] for s in range(6)]
    assert len({c.tobytes() for c in train}) > 1
    ev = [dm.to_item(dict(sample), random.Random(s), "val")["cond"] for s in range(3)]
    assert all(np.array_equal(e, ev[0]) for e in ev) and not np.array_equal(ev[0], to_signed(canny))
    flat = _dm(mid_reso=1.0)
    assert all(np.array_equal(flat.to_item(dict(sample), random.Random(s), "train")["cond"], to_signed(canny))
               for s in range(3))
    with pytest.raises(ValueError, match=r"mid_reso must be >= 1 \(resize, then crop\), got 0.9"):
        _dm(mid_reso=0.9)


def test_eval_condition_type_fixed_per_key_and_covers_every_type(shapes_shards):
    """With several condition types, evaluation gives each sample one type chosen by its key (not always type 0):
    the same on every pass, and each type gets some of the 16 validation images; the map matches the type."""
    def types():
        dm = _dm(val_shards=shapes_shards["val"], eval_batch_size=5, condition_types=["canny", "depth"])
        dm.setup("validate")
        out = {}
        for b in dm.val_dataloader():
            for k, c, cond in zip(b["key"], b["cond_type"].tolist(), b["cond"]):
                out[k] = c
                # canny maps are binary (-1 / 1), depth maps are grey levels in between
                assert (len(cond.unique()) <= 2) == (c == 0), (k, c)
        return out

    first = types()
    assert first == types() and set(first.values()) == {0, 1}


def test_no_matching_shards_fails_naming_pattern(tmp_path):
    dm = _dm(train_shards=str(tmp_path / "nothing-{000000..000003}.tar"))
    with pytest.raises(FileNotFoundError, match=r"nothing-\{000000\.\.000003\}\.tar"):
        dm.setup("fit")


def test_key_missing_everywhere_fails_naming_key(tmp_path):
    samples = [{"__key__": f"s{i}", "jpg": _jpg(), "cls": 0} for i in range(4)]
    write_shards(samples, str(tmp_path / "nocanny-%06d.tar"))
    dm = _dm(train_shards=str(tmp_path / "nocanny-000000.tar"))
    with pytest.raises(KeyError, match=r"canny\.png.*nocanny-000000\.tar"):
        dm.setup("fit")


def test_pipe_urls_and_lists(shapes_shards):
    first = resolve_shards(shapes_shards["train"], "t")[0]
    assert expand_urls(f"pipe:cat {first}") == [f"pipe:cat {first}"]
    dm = _dm(val_shards=[f"pipe:cat {first}"])
    dm.setup("validate")
    assert sum(len(b["key"]) for b in dm.val_dataloader()) == 8


def _jpg(seed: int = 0) -> bytes:
    from ctrlgen.datamodules.shards import encode_jpg

    return encode_jpg(shapes.render(seed, "train", 0, 32)["image"])


def _faulty_shards(tmp_path: Path) -> str:
    """Shard 0: one undecodable image, one sample without its condition; shard 1: truncated mid-file."""
    good = list(shapes.samples(0, "train", 12, 32))
    good[2]["jpg"] = b"this is not an image"
    del good[5]["canny.png"]
    write_shards(good[:8], str(tmp_path / "f0-%06d.tar"), maxcount=100)
    write_shards(good[8:], str(tmp_path / "f1-%06d.tar"), maxcount=100)
    p = tmp_path / "f1-000000.tar"
    with tarfile.open(p) as tf:
        member = tf.getmembers()[7]  # cut inside this member's data: a truncated tar, mid-file
    data = p.read_bytes()
    p.write_bytes(data[: member.offset_data + member.size // 2])
    with tarfile.open(p) as tf, pytest.raises(tarfile.ReadError):
        for m in tf.getmembers():
            tf.extractfile(m).read()
    return f"{tmp_path}/f0-000000.tar::{tmp_path}/f1-000000.tar"


def test_faults_are_skipped_and_counted_in_training(tmp_path):
    """A truncated tar, an undecodable image and a sample missing a key: training continues, skips are logged."""
    from ctrlgen.lightning_modules.cli import CtrlgenCLI

    shards = _faulty_shards(tmp_path)
    before = SKIPS.total
    cli = CtrlgenCLI(args=["fit", "-c", "tests/configs/tiny.yaml", f"--data.init_args.train_shards={shards}",
                           "--trainer.max_steps=10", "--data.init_args.train_batches_per_epoch=10",
                           "--trainer.val_check_interval=null", "--trainer.limit_val_batches=0",
                           f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert cli.trainer.global_step == 10
    reasons = dict(SKIPS.counts)
    assert SKIPS.total - before >= 3, reasons
    assert {"UnidentifiedImageError", "KeyError"} <= set(reasons), reasons
    assert any("Tar" in r or "EOF" in r or "Read" in r for r in reasons), reasons
    assert cli.trainer.logged_metrics["data/skipped"] >= 3


def test_keys_the_loader_does_not_read_are_not_decoded(tmp_path):
    """Samples are decoded lazily (ctrlgen.datamodules.shards.LazySample): a canny loader never decodes the depth/normal maps
    of multi-condition shards (no wasted work, and a corrupt unused map loses nothing); a depth loader reading the same
    corrupt map skips and counts every sample."""
    from ctrlgen.datamodules.shards import LazySample

    samples = list(shapes.samples(0, "train", 8, 32))
    for smp in samples:
        smp["depth.png"] = b"not a png"
    write_shards(samples, str(tmp_path / "l-%06d.tar"), maxcount=100)
    raw = {k: (str(v).encode() if k == "cls" else v) for k, v in samples[0].items() if k != "json"}
    lazy = LazySample(raw)
    item = _dm(condition_types=["canny"]).to_item(lazy, random.Random(0), "train")
    assert item["cond"].shape == (3, 32, 32) and lazy.decoded_keys() == {"jpg", "cls", "canny.png"}
    assert isinstance(dict.__getitem__(lazy, "normal.png"), bytes)  # still the raw bytes
    shard = str(tmp_path / "l-000000.tar")
    before = SKIPS.total
    canny = _dm(val_shards=shard, condition_types=["canny"], eval_batch_size=8)
    canny.setup("validate")
    assert sum(len(b["key"]) for b in canny.val_dataloader()) == 8 and SKIPS.total == before
    depth = _dm(val_shards=shard, condition_types=["depth"], eval_batch_size=8, probe_samples=0)  # no start-up probe
    depth.setup("validate")
    assert list(depth.val_dataloader()) == [] and SKIPS.total - before == 8
    with pytest.raises(ValueError, match=r"nothing decodable in the first 8 samples .*l-000000\.tar"):
        _dm(val_shards=shard, condition_types=["depth"], eval_batch_size=8).setup("validate")  # the probe: at set-up


def test_pack_folder_lists_and_skips_unreadable(tmp_path):
    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(shapes.render(0, "train", i, 32)["image"]).save(src / ("sub" if i % 2 else ".") / f"im{i}.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (tmp_path / "labels.json").write_text(json.dumps({"im0.png": 3, "sub/im1.png": "a caption"}))
    rep = pack_folder(src, str(tmp_path / "out" / "p-%06d.tar"), labels=tmp_path / "labels.json", maxcount=2,
                      progress=False, allow_unlabelled=True)
    assert rep["written"] == 5 and rep["skipped"] == 1 and rep["skipped_files"][0][0] == "broken.jpg"
    assert len(rep["shards"]) == 3
    again = pack_folder(src, str(tmp_path / "out2" / "p-%06d.tar"), labels=tmp_path / "labels.json", maxcount=2,
                        progress=False, allow_unlabelled=True)

    def members(shards):  # (shard, member name, payload) in archive order; tar headers (mtimes) left out
        out = []
        for p in shards:
            with tarfile.open(p) as tf:
                out += [(Path(p).name, m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
        return out

    first = members(rep["shards"])
    assert len(first) >= 5 and first == members(again["shards"])  # same shards, names, order and bytes
    names = [n for _, n, _ in first]
    assert "im0.cls" in names and "sub__im1.txt" in names
    keys = list(dict.fromkeys(n.split(".", 1)[0] for n in names))
    assert sorted(keys) == ["im0", "im2", "im4", "sub__im1", "sub__im3"]  # every readable file, once
    sorted_rep = pack_folder(src, str(tmp_path / "out3" / "p-%06d.tar"), maxcount=2, progress=False, shuffle_seed=None)
    sorted_keys = list(dict.fromkeys(n.split(".", 1)[0] for _, n, _ in members(sorted_rep["shards"])))
    assert sorted_keys == ["im0", "im2", "im4", "sub__im1", "sub__im3"]  # sorted relative paths, whatever the dir order


def test_pack_folder_mixes_class_folders_across_shards(tmp_path):
    """A class-per-folder tree (ImageNet's train/<wnid>/) packed with the default seed puts both classes in every
    shard; in sorted order each shard would hold one class (the stream then draws batches of few classes)."""
    src = tmp_path / "train"
    for c in ("n01", "n02"):
        (src / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(shapes.render(0, "train", i, 16)["image"]).save(src / c / f"{c}_{i}.png")

    def classes_per_shard(**kw):
        rep = pack_folder(src, str(tmp_path / f"o{len(kw)}" / "p-%06d.tar"), maxcount=4, progress=False, **kw)
        out = []
        for p in rep["shards"]:
            with tarfile.open(p) as tf:
                out.append({m.name.split("__", 1)[0] for m in tf.getmembers()})
        return out

    assert classes_per_shard(shuffle_seed=None) == [{"n01"}] * 2 + [{"n02"}] * 2
    assert classes_per_shard() == [{"n01", "n02"}] * 4


def test_pack_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pack_folder(tmp_path / "missing", str(tmp_path / "o-%06d.tar"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        pack_folder(tmp_path / "empty", str(tmp_path / "o-%06d.tar"), progress=False)


def test_shapes_world_is_deterministic_and_consistent():
    a, b = shapes.render(3, "train", 7, 32), shapes.render(3, "train", 7, 32)
    assert np.array_equal(a["image"], b["image"]) and a["label"] == b["label"]
    assert not np.array_equal(a["image"], shapes.render(3, "train", 8, 32)["image"])
    n = a["normal"]
    assert np.allclose(np.linalg.norm(n, axis=-1), 1, atol=1e-6)
    # the shape is nearer (brighter inverse depth) than the background plane
    assert a["inv_depth"][a["mask"]].mean() > a["inv_depth"][~a["mask"]].mean()
    s = next(shapes.samples(3, "train", 1, 32))
    edges = np.asarray(Image.open(io.BytesIO(s["canny.png"])))
    assert edges.ndim == 2 and set(np.unique(edges)) <= {0, 255} and edges.max() == 255


def test_shapes_world_canny_always_has_the_outline():
    """Every sample's shape clears canny's thresholds against the background (palette × shading), at the demo's 32 px
    and at 64 px: the condition traces most of the shape's outline and nothing in the background (with random
    colours 16 % of the maps were empty)."""
    k5 = np.ones((5, 5), np.uint8)
    for size in (32, 64):
        for s in shapes.samples(5, "train", 48, size):
            edges = np.asarray(Image.open(io.BytesIO(s["canny.png"]))) > 128
            mask = shapes.render(5, "train", int(s["__key__"].split("_")[1]), size)["mask"].astype(np.uint8)
            outline = (cv2.dilate(mask, np.ones((3, 3), np.uint8)) - cv2.erode(mask, np.ones((3, 3), np.uint8))) > 0
            near_edge = cv2.dilate(edges.astype(np.uint8), k5) > 0
            covered = (outline & near_edge).sum() / max(1, outline.sum())
            assert covered >= 0.6, (size, s["__key__"], round(float(covered), 3))  # the outline is in the condition
            assert (edges & ~(cv2.dilate(mask, k5) > 0)).sum() == 0, (size, s["__key__"])  # no background edges


def test_data_health_counts_only_this_runs_main_process_skips(monkeypatch):
    """num_workers=0: the skip counter is per process, so a later run in the same process (the demo's stages) must not
    report an earlier run's skips as its own."""
    from collections import Counter
    from types import SimpleNamespace

    from ctrlgen.callbacks.data_health import DataHealthCallback

    monkeypatch.setattr(SKIPS, "counts", Counter({"UnidentifiedImageError": 3}))  # an earlier run skipped 3
    cb = DataHealthCallback()
    cb.setup(None, None, "fit")
    main_loader = SimpleNamespace(num_workers=0)
    assert not cb._update({"_data_health": torch.tensor([0, 3])}, "train", main_loader)
    assert cb.skipped == 0
    assert cb._update({"_data_health": torch.tensor([0, 5])}, "train", main_loader)  # two new skips in this run
    assert cb.skipped == 2
    worker_loader = SimpleNamespace(num_workers=2)  # worker counters start at zero in every run: taken as they are
    cb._update({"_data_health": torch.tensor([1, 4])}, "train", worker_loader)
    assert cb.skipped == 6


def test_bench_data_smoke():
    """bench/bench_data.py runs (both loaders read every sample: asserted inside) and reports its ratio; timings are
    the benchmark's business (docs/benchmarks.md), not a test's."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_data.py"
    spec = importlib.util.spec_from_file_location("bench_data", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--size", "32", "--samples", "8", "--repeats", "1"])
    assert set(res["median_s"]) == {"lazy", "eager"} and res["eager_over_lazy"] > 0


def _tar_members(shards) -> list[str]:
    names = []
    for p in shards:
        with tarfile.open(p) as tf:
            names += [m.name for m in tf.getmembers()]
    return names


def test_pack_refuses_key_collisions_listing_the_files(tmp_path):
    img = shapes.render(0, "train", 0, 16)["image"]
    for group in (("a.jpg", "a.png"), ("sub/x.jpg", "sub__x.jpg"), ("v1.2.jpg", "v1_2.jpg")):
        src = tmp_path / f"src{len(list(tmp_path.iterdir()))}"
        for name in group:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(src / name)
        out = tmp_path / "out" / "p-%06d.tar"
        with pytest.raises(ValueError, match="key") as e:
            pack_folder(src, str(out), progress=False)
        assert all(name in str(e.value) for name in group), str(e.value)
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # nothing written


def test_pack_refuses_stale_shards_unless_overwrite(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(6):
        Image.fromarray(shapes.render(0, "train", i, 16)["image"]).save(src / f"im{i}.jpg")
    out = str(tmp_path / "out" / "p-%06d.tar")
    first = pack_folder(src, out, maxcount=2, progress=False)
    assert len(first["shards"]) == 3
    for p in list(src.iterdir())[:4]:
        p.unlink()
    with pytest.raises(FileExistsError, match=r"3 file\(s\) already match .*--overwrite"):
        pack_folder(src, out, maxcount=2, progress=False)
    second = pack_folder(src, out, maxcount=2, progress=False, overwrite=True)
    assert len(second["shards"]) == 1 and len(second["replaced"]) == 3
    assert sorted(Path(p).name for p in (tmp_path / "out").iterdir()) == ["p-000000.tar"]  # no stale shard left
    assert len(_tar_members(second["shards"])) == 2


def test_pack_lists_unlabelled_images_and_checks_out_pattern(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(3):
        Image.fromarray(shapes.render(0, "train", i, 16)["image"]).save(src / f"im{i}.jpg")
    (tmp_path / "labels.json").write_text(json.dumps({"im0": 1}))
    with pytest.raises(KeyError, match=r"2 of 3 images have no entry .*im1\.jpg.*--allow-unlabelled"):
        pack_folder(src, str(tmp_path / "o" / "p-%06d.tar"), labels=tmp_path / "labels.json", progress=False)
    rep = pack_folder(src, str(tmp_path / "o" / "p-%06d.tar"), labels=tmp_path / "labels.json", progress=False,
                      allow_unlabelled=True)
    assert rep["written"] == 3 and "im0.cls" in _tar_members(rep["shards"])
    with pytest.raises(ValueError, match="needs one integer field .*%06d"):
        pack_folder(src, str(tmp_path / "o2" / "shards.tar"), progress=False)


def test_pack_stores_every_image_under_one_key(tmp_path):
    """PNG and JPEG inputs land under ``jpg`` (JPEG bytes kept as they are) or, with ``image_format='png'``, all
    under ``png`` decoding to the same pixels as the input (lossless)."""
    src = tmp_path / "imgs"
    src.mkdir()
    img = shapes.render(0, "train", 1, 16)["image"]
    Image.fromarray(img).save(src / "p.png")
    Image.fromarray(img).save(src / "j.jpg", quality=90)
    jpg_bytes = (src / "j.jpg").read_bytes()
    rep = pack_folder(src, str(tmp_path / "a" / "p-%06d.tar"), progress=False)
    assert sorted(_tar_members(rep["shards"])) == ["j.jpg", "p.jpg"]
    with tarfile.open(rep["shards"][0]) as tf:
        assert tf.extractfile("j.jpg").read() == jpg_bytes
        assert Image.open(io.BytesIO(tf.extractfile("p.jpg").read())).format == "JPEG"
    rep = pack_folder(src, str(tmp_path / "b" / "p-%06d.tar"), progress=False, image_format="png")
    assert sorted(_tar_members(rep["shards"])) == ["j.png", "p.png"]
    with tarfile.open(rep["shards"][0]) as tf:
        assert np.array_equal(decode_value("p.png", tf.extractfile("p.png").read()), img)
    with pytest.raises(ValueError, match="'jpg' or 'png'"):
        pack_folder(src, str(tmp_path / "c" / "p-%06d.tar"), progress=False, image_format="webp")


def test_pack_names_unreadable_files_in_the_reason(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    Image.fromarray(shapes.render(0, "train", 1, 16)["image"]).save(src / "ok.jpg")
    (src / "broken.png").write_bytes(b"not a png at all")
    rep = pack_folder(src, str(tmp_path / "o" / "p-%06d.tar"), progress=False)
    (rel, why), = rep["skipped_files"]
    assert rel == "broken.png" and "broken.png" in why and "BytesIO" not in why, why


def test_startup_probe_fails_fast_on_non_tar_and_undecodable_shards(tmp_path):
    """A pattern matching a non-tar file, or shards whose every image fails to decode, fail at set-up naming the
    shard and the reason (they used to pass the start-up check and spin at step 0)."""
    import time

    fake = tmp_path / "fake-000000.tar"
    fake.write_bytes(b"this is a JPEG, not a tar" * 100)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"fake-000000\.tar.*not a readable tar"):
        _dm(train_shards=str(fake)).setup("fit")
    samples = list(shapes.samples(0, "train", 6, 32))
    for smp in samples:
        smp["jpg"] = b"not an image"
    write_shards(samples, str(tmp_path / "bad-%06d.tar"), maxcount=3)
    with pytest.raises(ValueError, match=r"nothing decodable in the first 6 samples of 2 shard.*UnidentifiedImage"):
        _dm(train_shards=str(tmp_path / "bad-{000000..000001}.tar")).setup("fit")
    with pytest.raises(ValueError, match=r"data\.val_shards: nothing decodable"):  # validation too (was rc 0)
        _dm(train_shards=str(tmp_path / "bad-000000.tar"), val_shards=str(fake)).setup("validate")
    assert time.perf_counter() - t0 < 30


def test_stream_of_failing_samples_stops_instead_of_spinning(tmp_path, monkeypatch):
    """Past the probe (disabled here), a resampled training stream over undecodable shards raises after
    MAX_CONSECUTIVE_SKIPS failures in a row, naming the reasons with example keys and shards."""
    import ctrlgen.datamodules.base as base

    monkeypatch.setattr(base, "MAX_CONSECUTIVE_SKIPS", 50)
    monkeypatch.setattr(SKIPS, "counts", Counter())  # this test's skips only (the counter is per process)
    monkeypatch.setattr(SKIPS, "examples", {})
    samples = list(shapes.samples(0, "train", 4, 32))
    for smp in samples:
        smp["jpg"] = b"not an image"
    write_shards(samples, str(tmp_path / "bad-%06d.tar"), maxcount=4)
    dm = _dm(train_shards=str(tmp_path / "bad-000000.tar"), probe_samples=0, num_workers=0)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match=r"last 50 samples/shards .*all failed.*UnidentifiedImageError ×\d+ "
                                           r"\(e\.g\. train_\d+ @ .*bad-000000\.tar"):
        next(iter(dm.train_dataloader()))


def test_skip_counter_reports_reasons_with_examples_periodically(caplog):
    from ctrlgen.datamodules.shards import SkipCounter

    c = SkipCounter(report_every=4)
    with pytest.warns(UserWarning, match=r"skipping sample k0 @ a\.tar \(KeyError"):
        c.handler(KeyError("canny.png"), key="k0", url="a.tar")
    with caplog.at_level("WARNING", logger="ctrlgen.datamodules.shards"):
        for i in range(1, 4):  # same reason: no new warning, but a summary at the 4th skip
            c.handler(KeyError("canny.png"), key=f"k{i}", url="b.tar")
    assert c.counts == {"KeyError": 4} and c.examples["KeyError"] == ["k0 @ a.tar", "k1 @ b.tar", "k2 @ b.tar"]
    assert any("4 samples skipped: KeyError ×4 (e.g. k0 @ a.tar" in r.getMessage() for r in caplog.records)
    with pytest.warns(UserWarning, match="ReadError"):  # a new reason is always said
        c.handler(tarfile.ReadError("truncated", "c.tar"))
    assert c.examples["ReadError"] == ["c.tar"]
