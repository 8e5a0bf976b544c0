"""What a web endpoint ships: with `serve=True`, the user's function behind a FastAPI app on port 8080.

This module travels by value with the app (the worker's environment has no fal_serverless), so it imports nothing
of the package, and FastAPI and uvicorn only inside the function that runs in the worker.
"""

from __future__ import annotations

from functools import wraps
from typing import Any, Callable

#: The port an app's server listens on in its worker (in the worker's own network namespace), as in the original.
SERVE_PORT = 8080


def create_webapp(func: Callable[..., Any]) -> Callable[[], None]:
    """A call of no arguments that serves `func` as the original 0.6.41 client does: a FastAPI app with permissive
    CORS and one route, `POST /`, bound to `func` (FastAPI binds its parameters: simple types from the query string,
    pydantic models from the JSON body), run by uvicorn on 0.0.0.0:8080. It never returns."""

    @wraps(func)
    def wrapper() -> None:
        from fastapi import FastAPI
        from fastapi.middleware.cors import CORSMiddleware
        from uvicorn import run

        app = FastAPI()

        # Beyond the original: a function that raises answers 500 with its error, not a bare "Internal Server
        # Error", and the traceback is printed (the app's logs). Not with Starlette's handler for `Exception`: that
        # one re-raises after answering, and uvicorn then closes the connection, which the gateway may already have
        # taken from its pool for the next request (which would get a 502). Added first, so CORS wraps it too.
        class AnswerErrors:
            def __init__(self, app: Any) -> None:
                self.app = app

            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                if scope["type"] != "http":
                    await self.app(scope, receive, send)
                    return
                started = False

                async def tracked(message: Any) -> None:
                    nonlocal started
                    started = started or message["type"] == "http.response.start"
                    await send(message)

                try:
                    await self.app(scope, receive, tracked)
                except Exception as error:
                    if started:
                        raise  # half an answer is out: only closing the connection can say it failed
                    import json
                    import traceback

                    traceback.print_exc()
                    detail = f"{type(error).__name__}: {error}"
                    body = json.dumps({"detail": detail, "error": "app_raised"}).encode()
                    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                    await send({"type": "http.response.start", "status": 500, "headers": headers})
                    await send({"type": "http.response.body", "body": body})

        app.add_middleware(AnswerErrors)
        app.add_middleware(
            CORSMiddleware,
            allow_credentials=True,
            allow_headers=("*"),
            allow_methods=("*"),
            allow_origins=("*"),
        )

        app.add_api_route("/", func, name=func.__name__, methods=["POST"])

        run(app, host="0.0.0.0", port=SERVE_PORT)

    return wrapper
