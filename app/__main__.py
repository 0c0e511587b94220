"""``python -m app``, and the ``activity`` console script: the command line (see
:mod:`app.cli`)."""

from __future__ import annotations

import logging
import os
import sys

from app import cli

__all__ = ["main"]


def main() -> int:
    """The console script (``[project.scripts]``), named in usage lines as it was invoked.
    Under ``-m``, ``sys.argv[0]`` is this file's path, so that entry names itself below."""
    return _finished(cli.main(prog=os.path.basename(sys.argv[0]) or "activity"))


def _finished(code: int) -> int:
    """``code``, for the caller to exit with; or, once the embedded SurrealDB engine (a Rust
    extension) was loaded, the process ends here with it. That engine can panic while the
    interpreter tears down the threads it started, turning a finished command's status (its
    answer to scripts) into SIGABRT; everything the command opened is closed by now, so its
    output and logs are flushed and the teardown skipped."""
    if "surrealdb._surrealdb_ext" not in sys.modules:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(_finished(cli.main(prog=cli.MODULE_PROG)))
