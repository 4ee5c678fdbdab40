"""require_pretrained_dir: the one check for local save_pretrained directories (nothing is downloaded)."""

from __future__ import annotations

import pytest

from lightning_modules.common.local_files import require_pretrained_dir


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
