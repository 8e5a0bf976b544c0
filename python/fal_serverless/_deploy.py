"""`fal-serverless function serve FILE FUNCTION`: the deploy, run by the Rust command line as
`python -m fal_serverless._deploy FILE FUNCTION --auth MODE [--alias NAME]` (it must run the user's file; clap owns
the command's arguments and --help, so these are checked there first). `function schedule CRON FILE FUNCTION` runs
`python -m fal_serverless._deploy FILE FUNCTION --cron CRON`: the function is registered and scheduled."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import List, Optional

from ._hosts import AUTH_MODES, Deployment, cloud
from ._isolated import IsolatedFunction
from .exceptions import FalServerlessError


def load_function(path: str, name: str) -> IsolatedFunction[object]:
    """Runs the file at `path` (as `python FILE` would, its directory first on sys.path, but not as `__main__`, so
    its `if __name__ == "__main__":` part does not run) and returns its isolated function `name`."""
    if not os.path.isfile(path):
        raise FalServerlessError(f"{path}: no such file; name the Python file that defines the function")
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    namespace = runpy.run_path(path)
    found = namespace.get(name)
    if not isinstance(found, IsolatedFunction):
        functions = sorted(k for k, v in namespace.items() if isinstance(v, IsolatedFunction))
        what = "is not an @isolated function" if name in namespace else "is not defined"
        choices = f"its isolated functions are: {', '.join(functions)}" if functions else "it defines none"
        raise FalServerlessError(f"{name!r} {what} in {path}; {choices}")
    return found


def describe(deployment: Deployment, auth: str) -> List[str]:
    """What the command prints: the revision, the URL, and a call a client can make."""
    if deployment.alias is not None:
        lines = [f"Registered a new revision for function '{deployment.alias}' (revision='{deployment.revision}')."]
    else:
        lines = [f"Registered anonymous function '{deployment.revision}'."]
    lines.append(f"URL: {deployment.url}")
    key = "" if auth == "public" else ' -H "Authorization: Key $FAL_KEY_ID:$FAL_KEY_SECRET"'
    lines.append("Call it:")
    lines.append(f"  curl -X POST {deployment.url}{key} -H 'Content-Type: application/json' -d '{{}}'")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fal-serverless function serve")
    parser.add_argument("file")
    parser.add_argument("function")
    parser.add_argument("--alias")
    parser.add_argument("--auth", choices=AUTH_MODES, default="private")
    parser.add_argument("--cron")
    args = parser.parse_args(argv)
    if args.cron is not None:
        return schedule(args.file, args.function, args.cron)
    try:
        function = load_function(args.file, args.function)
        # The command deploys to the server (FAL_HOST's, or the local one) whatever host the function runs on.
        if function.options.host is not cloud:
            function = function.on(cloud)
        deployment = function.deploy(alias=args.alias, auth=args.auth)
    except (FalServerlessError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n".join(describe(deployment, args.auth)), flush=True)
    return 0


def schedule(path: str, name: str, cron: str) -> int:
    """Registers function `name` of `path` and schedules it at `cron`; prints the schedule's id."""
    try:
        function = load_function(path, name)
        if function.options.serve or function.options.exposed_port is not None:
            raise FalServerlessError(
                f"{name} is a web endpoint (serve=True or exposed_port): a schedule runs a function that returns; "
                f"schedule a function without them"
            )
        # The command schedules on the server (FAL_HOST's, or the local one) whatever host the function runs on.
        cron_id = cloud.schedule(function.func, function.options, cron, function._qualified_name())
    except (FalServerlessError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Scheduled {name} at {cron!r} (UTC): schedule {cron_id}", file=sys.stderr, flush=True)
    print(cron_id, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
