"""ctrlgen LightningModules. Importing this package imports every method, so that checkpoints can rebuild their class
(lightning 2.6.6 refuses classes that are not already imported; platform.md §1)."""

import importlib

METHODS = ("ecm",)
for _m in METHODS:
    try:
        importlib.import_module(f"ctrlgen.lightning_modules.{_m}")
    except ModuleNotFoundError as _e:  # a method under construction must not break the others
        if _e.name and _e.name.startswith(f"ctrlgen.lightning_modules.{_m}"):
            continue
        raise
