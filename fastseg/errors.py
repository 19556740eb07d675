"""User-facing errors: a mistake in the input ends with one clear line and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable

# Exit status of a user mistake (argparse uses 2 for bad flags too).
USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake the user can fix (bad path, bad flag, wrong checkpoint).

    The message must name the file or flag and say what to do. Scripts print it as one line
    with no traceback; anything else is a bug and keeps its traceback.
    """


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a script's ``main``: a :class:`UserError` becomes ``error: ...`` and exit 2, Ctrl-C exit 130."""
    try:
        code = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)  # the shell's status for a process ended by SIGINT
    sys.exit(code or 0)
