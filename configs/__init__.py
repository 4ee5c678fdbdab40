"""The recipes, installed as ``ctrlgen.configs``: ``ctrlgen fit -c ecm/demo_var.yaml`` finds them from any folder.

:func:`resolve_config` turns a ``-c`` argument into a file: an existing path as given, else the same name inside
this package (with or without a leading ``configs/``).
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
BASE_CONFIG = CONFIG_DIR / "base.yaml"


def resolve_config(name: str | Path) -> Path | None:
    """The config file ``name`` names: as given if it exists, else under :data:`CONFIG_DIR`; ``None`` if neither."""
    path = Path(name)
    if path.is_file():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    packaged = CONFIG_DIR.joinpath(*parts) if parts and not path.is_absolute() else None
    return packaged if packaged is not None and packaged.is_file() else None
