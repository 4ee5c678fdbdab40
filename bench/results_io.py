"""What every benchmark script does with its result: print it as one JSON line (the record docs/benchmarks.md quotes)
and, when ``--json PATH`` was given, write it there indented. Bench scripts import it as a sibling
(``sys.path`` holds ``bench/`` when a script runs; the loaders in tests add it too)."""

from __future__ import annotations

import json
from typing import Any


def emit(res: dict[str, Any], path: str | None) -> dict[str, Any]:
    """Print ``res`` as one JSON line, write it to ``path`` if given, and return it."""
    print(json.dumps(res))
    if path:
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1)
    return res
