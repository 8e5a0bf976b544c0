"""Runs every example of the fal-serverless reference (examples/reference/*.py), each in its own process.

    python examples/run.py [--host local|cloud]

--host names the host that functions which name none run on (it sets FAL_SERVERLESS_HOST for them). The default,
`cloud`, is the server FAL_HOST names, or else one on this machine, started for you on first use.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent / "reference"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", choices=["local", "cloud"], default="cloud")
    parser.add_argument("names", nargs="*", help="run only examples whose file name contains one of these")
    args = parser.parse_args()

    env = dict(os.environ, FAL_SERVERLESS_HOST=args.host, PYTHONUNBUFFERED="1")
    failed = []
    for script in sorted(EXAMPLES.glob("*.py")):
        if args.names and not any(n in script.name for n in args.names):
            continue
        print(f"=== {script.name} (default host: {args.host})", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, str(script)], env=env)
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"=== {script.name}: {status} in {time.monotonic() - started:.2f}s\n", flush=True)
        if code != 0:
            failed.append(script.name)
    if failed:
        print(f"{len(failed)} example(s) failed: {', '.join(failed)}")
        return 1
    print("all examples ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
