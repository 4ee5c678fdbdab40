"""EXIF parsing, split rule, encoding and ``pack --exif`` (spec defocus.md §5), on JPEGs written here with Pillow."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from ctrlgen.datamodules.pack import pack_folder
from ctrlgen.lightning_modules.defocus.exif import (
    ExifEmbedding,
    after_crop,
    camera_record,
    dof_split,
    exif_code,
    fourier_features,
    rational,
    read_exif,
    upright,
)
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational



def jpeg(width: int = 60, height: int = 40, orientation: int | None = None, **tags) -> bytes:
    """A JPEG whose Exif sub-IFD holds ``tags`` (name → value; rationals as (num, den)); left half red, right blue."""
    names = {"FNumber": 0x829D, "FocalLength": 0x920A, "FocalLengthIn35mmFilm": 0xA405, "ApertureValue": 0x9202,
             "PixelXDimension": 0xA002, "FocalPlaneXResolution": 0xA20E, "FocalPlaneResolutionUnit": 0xA210}
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 2, 0], a[:, width // 2:, 2] = 255, 255
    ex = Image.Exif()
    if orientation is not None:
        ex[0x0112] = orientation
    sub = ex.get_ifd(ExifTags.IFD.Exif)
    for name, v in tags.items():
        sub[names[name]] = IFDRational(*v) if isinstance(v, tuple) else v
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=95, exif=ex)
    return buf.getvalue()


def test_round_trip_of_the_three_tags():
    rec = read_exif(jpeg(FNumber=(18, 10), FocalLength=(50, 1), FocalLengthIn35mmFilm=75))
    assert rec["fnumber"] == pytest.approx(1.8) and rec["focal_mm"] == 50.0 and rec["focal35_mm"] == 75.0
    assert rec["exif_source"] == {"fnumber": "FNumber", "focal35_mm": "FocalLengthIn35mmFilm"}
    assert rec["exif_missing"] == {} and rec["dof"] == "shallow"
    assert (rec["width"], rec["height"], rec["orientation"]) == (60, 40, 1)
    json.dumps(rec)  # JSON-able


def test_no_exif_and_missing_tags_give_none_with_reasons():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    rec = read_exif(buf.getvalue())
    assert rec["fnumber"] is None and rec["focal35_mm"] is None and rec["dof"] is None
    assert rec["exif_missing"]["fnumber"] == "no EXIF"
    rec = read_exif(jpeg(FocalLength=(35, 1)))
    assert rec["fnumber"] is None and "FNumber: tag absent" in rec["exif_missing"]["fnumber"]
    assert rec["focal35_mm"] is None and "FocalLengthIn35mmFilm" in rec["exif_missing"]["focal35_mm"]


def test_zero_denominator_reads_as_missing():
    value, why = rational(IFDRational(1, 0))
    assert value is None and why == "zero denominator"
    assert rational((4, 0)) == (None, "zero denominator")
    assert rational(float("nan"))[0] is None and rational("abc")[0] is None
    rec = read_exif(jpeg(FNumber=(28, 0), FocalLength=(1, 0), FocalLengthIn35mmFilm=50))
    assert rec["fnumber"] is None and "zero denominator" in rec["exif_missing"]["fnumber"]
    assert rec["focal_mm"] is None and rec["exif_missing"]["focal_mm"] == "zero denominator"
    assert rec["focal35_mm"] == 50.0


def test_apex_fallback_and_absurd_values():
    rec = read_exif(jpeg(ApertureValue=(4, 1), FocalLengthIn35mmFilm=50))  # Av 4 → N = 2^2 = 4
    assert rec["fnumber"] == pytest.approx(4.0) and rec["exif_source"]["fnumber"] == "ApertureValue"
    assert rec["dof"] is None  # f/4 is neither shallow nor deep
    rec = read_exif(jpeg(FNumber=(500, 1), FocalLengthIn35mmFilm=5000))
    assert rec["fnumber"] is None and "outside the valid range" in rec["exif_missing"]["fnumber"]
    assert rec["focal35_mm"] is None and "outside the valid range" in rec["exif_missing"]["focal35_mm"]


@pytest.mark.parametrize("unit,res", [(2, (60 * 254, 236)), (3, (6000, 236)), (4, (600, 236))])
def test_crop_factor_fallback_for_units_inch_cm_mm(unit, res):
    """A 23.6 mm-wide sensor (APS-C) 60 px wide, resolution in px per inch, cm or mm: f35 = 35 × 36 / 23.6."""
    rec = read_exif(jpeg(FNumber=(2, 1), FocalLength=(35, 1), PixelXDimension=60, FocalPlaneXResolution=res,
                         FocalPlaneResolutionUnit=unit))
    assert rec["focal35_mm"] == pytest.approx(35 * 36 / 23.6, rel=1e-6)
    assert rec["exif_source"]["focal35_mm"] == "crop_factor" and rec["dof"] == "shallow"


def test_crop_factor_fallback_refused_on_a_resized_file():
    """PixelXDimension 6000 on a 60 px file: the camera's FocalPlaneXResolution does not describe this width."""
    tags = {"FNumber": (2, 1), "FocalLength": (35, 1), "PixelXDimension": 6000,
            "FocalPlaneXResolution": (60000, 236), "FocalPlaneResolutionUnit": 4}
    rec = read_exif(jpeg(**tags))
    assert rec["focal35_mm"] is None and "!= stored width 60" in rec["exif_missing"]["focal35_mm"]
    rec = read_exif(jpeg(**tags), missing="assume_full_frame")
    assert rec["focal35_mm"] == 35.0 and rec["exif_source"]["focal35_mm"] == "assume_full_frame"
    bad_unit = read_exif(jpeg(**{**tags, "PixelXDimension": 60, "FocalPlaneResolutionUnit": 7}))
    assert bad_unit["focal35_mm"] is None and "unusable" in bad_unit["exif_missing"]["focal35_mm"]
    with pytest.raises(ValueError, match="exif.missing"):
        read_exif(jpeg(**tags), missing="guess")


def test_orientation_swaps_size_and_upright_rotates_pixels():
    data = jpeg(60, 40, orientation=6, FNumber=(8, 1), FocalLengthIn35mmFilm=24)
    rec = read_exif(data)
    assert (rec["width"], rec["height"], rec["orientation"]) == (40, 60, 6) and rec["dof"] == "deep"
    up = upright(data)
    assert up.shape == (60, 40, 3)
    # orientation 6 = rotate 90° clockwise for display: the left (red) half of the stored image becomes the top
    assert up[5, 20, 0] > 200 and up[5, 20, 2] < 60 and up[-5, 20, 2] > 200
    assert upright(jpeg(60, 40)) is None


def test_crop_correction_and_split_rule():
    rec = read_exif(jpeg(100, 50, FNumber=(28, 10), FocalLengthIn35mmFilm=28))
    assert rec["dof"] is None  # f/2.8 at 28 mm: too wide for the shallow set
    cropped = after_crop(rec, 50, 50)
    assert cropped["focal35_mm"] == pytest.approx(56.0) and cropped["dof"] == "shallow" and cropped["width"] == 50
    with pytest.raises(ValueError, match="does not fit"):
        after_crop(rec, 200, 50)
    assert dof_split(2.8, 35.0) == "shallow" and dof_split(2.9, 85.0) is None and dof_split(8.0, None) == "deep"
    assert dof_split(1.4, None) is None and dof_split(None, 50.0) is None
    assert dof_split(4.0, 50.0, shallow_max_n=4.0) == "shallow"


def test_encoding_values_and_embedding():
    code = exif_code(torch.tensor([4.0, 1.4, 22.0]), torch.tensor([50.0, 200.0, 25.0]))
    assert torch.allclose(code[0], torch.tensor([0.0, 0.0]))
    assert code[1, 0] == pytest.approx((math.log2(1.4) - 2) / 2) and code[1, 1] == pytest.approx(1.0)
    assert code[2, 1] == pytest.approx(-0.5) and bool((code.abs() < 1.3).all())
    feats = fourier_features(code, 8)
    assert feats.shape == (3, 2 * 17) and torch.allclose(feats[:, :2], code)
    emb = ExifEmbedding(dim=16)
    n = torch.tensor([2.0, 8.0], requires_grad=True)
    tok = emb(n, 50.0)
    assert tok.shape == (2, 16) and not torch.allclose(tok[0], tok[1])
    tok.sum().backward()
    assert n.grad is not None and bool(torch.isfinite(n.grad).all()) and bool((n.grad != 0).all())


def _samples(pattern_dir) -> dict[str, dict]:
    out = {}
    for path in sorted(pattern_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_pack_folder_with_exif_merges_labels_and_stores_upright(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg(FNumber=(14, 10), FocalLength=(85, 1), FocalLengthIn35mmFilm=85))
    (src / "b.jpg").write_bytes(jpeg(60, 40, orientation=8, FNumber=(11, 1), FocalLengthIn35mmFilm=35))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    (src / "c.png").write_bytes(buf.getvalue())
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"a": {"caption": "a red and blue card", "fnumber": 1.2}, "b": "a caption"}))
    out = tmp_path / "out"
    out.mkdir()
    rep = pack_folder(src, str(out / "train-%06d.tar"), labels=labels, progress=False, metadata=camera_record,
                      allow_unlabelled=True)
    assert rep["written"] == 3
    s = _samples(out)
    a, b, c = (json.loads(s[k]["json"]) for k in ("a", "b", "c"))
    assert a["caption"] == "a red and blue card" and a["fnumber"] == 1.2 and a["focal35_mm"] == 85.0  # label wins
    assert a["dof"] == "shallow" and s["b"]["txt"] == b"a caption"
    assert b["dof"] == "deep" and (b["width"], b["height"]) == (40, 60)
    assert Image.open(io.BytesIO(s["b"]["jpg"])).size == (40, 60)  # stored upright
    assert c["fnumber"] is None and c["exif_missing"]["fnumber"] == "no EXIF"
    plain = tmp_path / "plain"
    plain.mkdir()
    pack_folder(src, str(plain / "train-%06d.tar"), progress=False)
    assert "json" not in _samples(plain)["a"]  # without exif the samples are unchanged


def test_cli_pack_has_the_exif_flag():
    from ctrlgen.lightning_modules.apps.data import parser

    args = parser().parse_args(["pack", "--src", "s", "--out", "o-%06d.tar", "--exif"])
    assert args.exif is True
    assert parser().parse_args(["pack", "--src", "s", "--out", "o-%06d.tar"]).exif is False
