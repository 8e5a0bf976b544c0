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

        app.add_middleware(
            CORSMiddleware,
            allow_credentials=True,
            allow_headers=("*"),
            allow_methods=("*"),
            allow_origins=("*"),
        )

        app.add_api_route("/", func, name=func.__name__, methods=["POST"])

        # Beyond the original: a function that raises answers 500 with its error, not a bare "Internal Server
        # Error" (the traceback is still printed, in the app's logs).
        from fastapi.responses import JSONResponse

        async def raised(request: Any, error: Exception) -> Any:
            detail = f"{type(error).__name__}: {error}"
            return JSONResponse(status_code=500, content={"detail": detail, "error": "app_raised"})

        app.add_exception_handler(Exception, raised)

        run(app, host="0.0.0.0", port=SERVE_PORT)

    return wrapper
