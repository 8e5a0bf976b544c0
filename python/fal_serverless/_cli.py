"""The `fal-serverless` command: the Rust command line (crates/cli), run from this package."""

from __future__ import annotations

import os
import sys

from . import _native


def main() -> None:
    from ._hosts import find_uv

    # The server builds environments with the uv that came with this package.
    os.environ.setdefault("FAL_SERVERLESS_UV", find_uv())
    # `function serve` runs the user's file in Python: this one, which has this package, unless another is named.
    os.environ.setdefault(_native.PYTHON_VARIABLE, sys.executable)
    # A server offers this package to its workers, for functions that call other isolated functions.
    os.environ.setdefault("FAL_SERVERLESS_SDK", os.path.dirname(os.path.abspath(__file__)))
    try:
        code = _native.cli_main(["fal-serverless", *sys.argv[1:]])
    except KeyboardInterrupt:
        # Ctrl-C the command handled itself (`logs --follow` ends on it) still reaches Python's handler once the
        # command returns: no traceback for it.
        code = 130
    sys.exit(code)
