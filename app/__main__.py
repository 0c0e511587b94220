"""``python -m app``, and the ``activity`` console script: the command line (see
:mod:`app.cli`)."""

from __future__ import annotations

import os
import sys

from app import cli

__all__ = ["main"]


def main() -> int:
    """The console script (``[project.scripts]``), named in usage lines as it was invoked.
    Under ``-m``, ``sys.argv[0]`` is this file's path, so that entry names itself below."""
    return cli.main(prog=os.path.basename(sys.argv[0]) or "activity")


if __name__ == "__main__":
    sys.exit(cli.main(prog=cli.MODULE_PROG))
