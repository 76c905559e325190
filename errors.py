"""One error type for user mistakes, and the CLI wrapper that turns it into one line + exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake the user can fix: the message says what was wrong, where, and what to do."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a CLI entry point: a UserError prints `error: <message>` on one line and exits 2."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
