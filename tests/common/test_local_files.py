"""require_pretrained_dir: the one check for local save_pretrained directories; find_local_file: the search for one
weight file (nothing is downloaded)."""

from __future__ import annotations

import pytest

from ctrlgen.lightning_modules.common.local_files import find_local_file, require_pretrained_dir


def test_require_pretrained_dir(tmp_path, monkeypatch):
    good = tmp_path / "model"
    good.mkdir()
    (good / "config.json").write_text("{}")
    assert require_pretrained_dir(good, "depth model", "Intel/dpt-large") == good
    monkeypatch.setenv("CT_DIR", str(good))
    assert require_pretrained_dir(None, "depth model", "Intel/dpt-large", env="CT_DIR") == good  # env fallback
    monkeypatch.delenv("CT_DIR")
    with pytest.raises(FileNotFoundError, match="no depth model directory given and CT_DIR is not set"):
        require_pretrained_dir(None, "depth model", "Intel/dpt-large", env="CT_DIR")
    with pytest.raises(FileNotFoundError, match=r"'.*missing' not found: save Intel/dpt-large .* set CT_DIR"):
        require_pretrained_dir(tmp_path / "missing", "depth model", "Intel/dpt-large", env="CT_DIR")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):  # a diffusers pipeline directory
        require_pretrained_dir(tmp_path / "empty", "SD pipeline", "a pipeline", marker="model_index.json")


def test_find_local_file_order_layouts_and_tried_list(tmp_path):
    name = "w.pth"
    flat, home, missing = tmp_path / "flat", tmp_path / "home", tmp_path / "missing"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    flat.mkdir()
    f_home = home / "hub" / "checkpoints" / name
    f_home.write_bytes(b"x")
    layouts = ("", "checkpoints", "hub/checkpoints")
    # a folder root is searched in its layouts; the first root that holds the file wins
    assert find_local_file([missing, flat, home], name, layouts)[0] == f_home
    (flat / name).write_bytes(b"y")
    assert find_local_file([missing, flat, home], name, layouts)[0] == flat / name
    # a root that is the file itself
    assert find_local_file([f_home], name)[0] == f_home
    # nothing found: every path tried, in order, once
    found, tried = find_local_file([missing, missing], name, ("", "checkpoints"))
    assert found is None
    assert tried == [str(missing), str(missing / name), str(missing / "checkpoints" / name)]
