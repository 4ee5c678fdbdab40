"""ctrlgen LightningModules. :func:`import_methods` imports every method, so that checkpoints can rebuild their class
(lightning 2.6.6 refuses classes that are not already imported; platform.md §1). The CLI
(``ctrlgen.lightning_modules.common.lightning_cli``) calls it when it is imported; the package itself imports nothing,
so that ``ctrlgen --help`` and the data tools start without torch. A script that calls
``BaseGenModule.load_from_checkpoint`` calls :func:`import_methods` first (or imports the method's package)."""

import importlib

METHODS = ("ecm",)


def import_methods() -> None:
    """Import every method package in :data:`METHODS` (a method under construction, not importable yet, is skipped)."""
    for m in METHODS:
        try:
            importlib.import_module(f"ctrlgen.lightning_modules.{m}")
        except ModuleNotFoundError as e:  # a method under construction must not break the others
            if e.name and e.name.startswith(f"ctrlgen.lightning_modules.{m}"):
                continue
            raise
