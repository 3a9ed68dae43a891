"""Processes in which torch (and transformers) cannot be imported.

A round's driver only plans, starts actors and writes manifests; the actors load the models.
Tests that run a whole driver in its own process use ``torch_free_capfilt``, so any import of
torch or transformers on the driver's side fails them (Ray's worker processes import as usual).

img2dataset does not need torch, but webdataset imports it when it can: 8 to 9 s per process
on this 2-core machine, and img2dataset's run is two processes (it spawns its downloader).
``torch_hidden_env`` gives the tests' img2dataset runs an environment without torch, as on a
download machine that has none.
"""

import os
import sys
from pathlib import Path

BLOCKED = ("torch", "transformers")
PRELUDE = (
    "import sys\n"
    f"for name in {BLOCKED!r}:\n"
    "    sys.modules[name] = None  # 'import torch' now raises ImportError\n"
)


def torch_free_python(code: str, *args) -> list[str]:
    """The command that runs ``code`` (``sys.argv[1:]`` = ARGS) without torch or transformers."""
    return [sys.executable, "-c", PRELUDE + code, *map(str, args)]


def torch_free_capfilt(*args) -> list[str]:
    """The command that runs ``capfilt ARGS`` without torch or transformers in its process."""
    return torch_free_python("from pipelines.cli import main\nsys.exit(main(sys.argv[1:]))\n", *args)


def torch_hidden_env(folder: Path) -> dict[str, str]:
    """``os.environ`` with a stub ``torch`` package first on PYTHONPATH (written to ``folder``):
    ``import torch`` raises ModuleNotFoundError in every process started with it, children
    included, which is how torch's optional users (webdataset) tell that it is not installed."""
    stub = folder / "torch"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text(
        'raise ModuleNotFoundError("torch is hidden from this process (tests/torch_free.py)", '
        'name="torch")\n')
    path = [str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
