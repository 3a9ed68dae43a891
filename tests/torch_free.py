"""The ``capfilt`` command line in a process where torch and transformers cannot be imported.

A round's driver only plans, starts actors and writes manifests; the actors load the models.
Tests that run a whole driver in its own process use this, so any import of torch or
transformers on the driver's side fails them (Ray's worker processes import as usual).
"""

import sys

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
