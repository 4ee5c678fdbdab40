"""Local pretrained directories: every real weight loads from a path the user gives, never from a hub.

:func:`require_pretrained_dir` is the one check (and the one error message) for a ``save_pretrained`` directory of
transformers / diffusers / peft models: metrics' estimators now, the methods' frozen bases later.
:func:`find_local_file` is the search for a single weight file (a path, a folder holding it, a TORCH_HOME layout).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path


def require_pretrained_dir(path: str | os.PathLike | None, what: str, example: str, env: str | None = None,
                           marker: str = "config.json") -> Path:
    """``path`` (or env ``env`` when ``path`` is None) as a directory holding ``marker``; else FileNotFoundError that
    names the directory, the missing file, an example model to save there and the env variable;
    NotADirectoryError when ``path`` is a file (e.g. the weights file inside the directory)."""
    if path is None and env is not None:
        path = os.environ.get(env)
    where = f" or set {env}" if env else ""
    if path is None:
        raise FileNotFoundError(f"no {what} directory given{f' and {env} is not set' if env else ''}: save {example} "
                                f"with save_pretrained into a local directory and pass its path; nothing is downloaded")
    p = Path(path).expanduser()
    if p.is_file():
        raise NotADirectoryError(f"{what} path {str(p)!r} is a file, but a save_pretrained directory is expected: "
                                 f"give the folder that holds {marker} and the weights (save {example} there with "
                                 f"save_pretrained){where}")
    if not p.is_dir() or not (p / marker).is_file():
        problem = "not found" if not p.is_dir() else f"has no {marker}"
        raise FileNotFoundError(f"{what} directory {str(p)!r} {problem}: save {example} there with save_pretrained "
                                f"and pass its path{where}; nothing is downloaded")
    return p


def find_local_file(roots: Iterable[str | os.PathLike], name: str,
                    subdirs: Sequence[str] = ("",)) -> tuple[Path | None, list[str]]:
    """The first existing file among, for each root in order, the root itself (unless it is a folder) and
    ``root/<subdir>/name`` for each subdir (``""``: the root). Returns (that file or None, the paths tried, in
    order and once each) so that the caller's error message can list them."""
    tried: list[str] = []
    for root in roots:
        r = Path(root).expanduser()
        for cand in ([] if r.is_dir() else [r]) + [r / s / name if s else r / name for s in subdirs]:
            tried.append(str(cand))
            if cand.is_file():
                return cand, list(dict.fromkeys(tried))
    return None, list(dict.fromkeys(tried))
