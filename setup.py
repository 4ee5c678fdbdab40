"""Packaging: the repository's top-level folders install as one namespace, ``ctrlgen.<folder>``.

The design card keeps ``lightning_modules/``, ``datamodules/``, ``callbacks/`` and ``configs/`` at the top of the
repository; installed (editable or not) they are ``ctrlgen.lightning_modules`` and so on, so nothing generic lands in
site-packages. Metadata and dependencies are in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

TOP_LEVEL = ("lightning_modules", "datamodules", "callbacks", "configs")


def ctrlgen_packages() -> list[str]:
    found = find_namespace_packages(include=[f"{t}*" for t in TOP_LEVEL], exclude=["*__pycache__*", "configs.*"])
    return sorted(f"ctrlgen.{p}" for p in found if p.split(".")[0] in TOP_LEVEL)


setup(packages=ctrlgen_packages(), package_dir={f"ctrlgen.{t}": t for t in TOP_LEVEL})
