"""Web endpoints in the SDK and CLI, without a server: option validation, what `serve=True` adds and ships, and the
errors of a deploy that cannot happen. The deploys themselves are in test_apps.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import FAL_SERVERLESS, script_env
from fal_serverless import SERVE_REQUIREMENTS, FalServerlessError, cloud, isolated, local
from fal_serverless._deploy import describe, load_function
from fal_serverless._hosts import Deployment
from fal_serverless._webapp import create_webapp


def f(x: int = 1) -> int:
    return x + 1


@pytest.mark.parametrize("value", [1, "yes", None, 0])
def test_serve_must_be_a_bool(value: Any) -> None:
    with pytest.raises(ValueError, match="serve must be True or False"):
        isolated(serve=value)(f)


@pytest.mark.parametrize("value", [8081, 80, "8080", 8080.5, True, -1])
def test_only_port_8080_can_be_exposed(value: Any) -> None:
    with pytest.raises(ValueError, match="exposed_port must be 8080"):
        isolated(exposed_port=value)(f)


def test_port_8080_and_none_are_accepted() -> None:
    assert isolated(exposed_port=8080)(f).options.exposed_port == 8080
    assert isolated(exposed_port=None)(f).options.exposed_port is None


@pytest.mark.parametrize(
    "option, value, range_",
    [
        ("max_concurrency", 0, "from 1 to 2147483647"),
        ("max_concurrency", 2**31, "from 1 to 2147483647"),
        ("max_concurrency", 2.0, "from 1 to 2147483647"),
        ("max_concurrency", True, "from 1 to 2147483647"),
        ("min_concurrency", -1, "from 0 to 2147483647"),
        ("min_concurrency", "1", "from 0 to 2147483647"),
        ("max_multiplexing", 0, "from 1 to 2147483647"),
        ("max_multiplexing", float("nan"), "from 1 to 2147483647"),
    ],
)
def test_counts_are_whole_numbers_in_their_range(option: str, value: Any, range_: str) -> None:
    with pytest.raises(ValueError, match=f"{option} .* must be a whole number {range_}, got"):
        isolated(**{option: value})(f)


def test_counts_in_range_are_kept_and_on_changes_them() -> None:
    fn = isolated(serve=True, max_concurrency=4, min_concurrency=0, max_multiplexing=2)(f)
    o = fn.options
    assert (o.max_concurrency, o.min_concurrency, o.max_multiplexing) == (4, 0, 2)
    assert fn.on(max_concurrency=2147483647).options.max_concurrency == 2147483647
    assert fn.on(min_concurrency=4).options.min_concurrency == 4


def test_min_concurrency_over_max_is_refused() -> None:
    with pytest.raises(ValueError, match=r"min_concurrency \(3\) is more than max_concurrency \(2\)"):
        isolated(min_concurrency=3, max_concurrency=2)(f)
    with pytest.raises(ValueError, match="min_concurrency"):
        isolated(max_concurrency=2)(f).on(min_concurrency=5)


def test_serve_adds_fastapi_and_a_pinned_uvicorn_unless_named() -> None:
    assert SERVE_REQUIREMENTS == ("fastapi==0.99.1", "uvicorn==0.33.0")
    plain = isolated(requirements=["pyjokes"])(f)
    assert plain.options.environment_requirements == ("pyjokes",)
    served = plain.on(serve=True)
    assert served.options.environment_requirements == ("pyjokes", "fastapi==0.99.1", "uvicorn==0.33.0")
    # The user's own pin wins (the names compare as PEP 503 normalizes them).
    own = isolated(serve=True, requirements=["Uvicorn[standard]>=0.30"])(f)
    assert own.options.environment_requirements == ("Uvicorn[standard]>=0.30", "fastapi==0.99.1")
    # What the user asked for is left as it was: .on(serve=False) drops what serve added.
    assert served.options.requirements == ("pyjokes",)
    assert served.on(serve=False).options.environment_requirements == ("pyjokes",)


def test_serve_ships_a_webapp_wrapper_and_exposed_port_the_function_itself() -> None:
    served = isolated(serve=True)(f)
    app = served.app()
    assert app is not f and app.__name__ == "f" and app.__wrapped__ is f  # type: ignore[attr-defined]
    assert isolated(exposed_port=8080)(f).app() is f
    both = isolated(serve=True, exposed_port=8080)(f)
    assert both.app() is not f


def test_create_webapp_travels_by_value() -> None:
    """The worker has no fal_serverless: the wrapper must unpickle without it."""
    from fal_serverless._serialization import dump_call

    payload = dump_call(create_webapp(f), (), {}).payload
    code = (
        "import sys, pickle; sys.modules['fal_serverless'] = None\n"
        "fn, args, kwargs = pickle.loads(sys.stdin.buffer.read()); print(fn.__name__, fn.__wrapped__(41))"
    )
    proc = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split() == ["f", "42"]


def test_deploying_needs_serve_or_exposed_port() -> None:
    with pytest.raises(FalServerlessError, match=r"not a web endpoint: set serve=True .* or exposed_port=8080"):
        isolated(host=cloud)(f).serve()


def test_deploying_on_the_local_host_says_it_needs_a_server() -> None:
    with pytest.raises(FalServerlessError, match=r"needs a server.*fn\.on\(cloud\)\.serve"):
        isolated(serve=True, host=local)(f).serve(alias="web")


@pytest.mark.parametrize("auth", ["open", "PRIVATE", "", None])
def test_auth_is_private_public_or_shared(auth: Any) -> None:
    with pytest.raises(ValueError, match="auth must be one of private, public, shared"):
        isolated(serve=True, host=cloud)(f).serve(auth=auth)


@pytest.mark.parametrize("alias", ["", "a/b", "a b", "x?y", 5])
def test_alias_must_be_a_path_segment(alias: Any) -> None:
    with pytest.raises(ValueError, match="alias must be a non-empty name"):
        isolated(serve=True, host=cloud)(f).serve(alias=alias)


def test_a_served_function_called_directly_is_a_plain_call() -> None:
    """The environment has fastapi and uvicorn; the call runs the function and returns, no server started."""

    @isolated(serve=True, host=local, keep_alive=0)
    def add(x: int) -> str:
        import fastapi

        return f"{x + 1} {fastapi.__version__}"

    assert add(41) == "42 0.99.1"


def write(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "app.py"
    path.write_text(textwrap.dedent(source))
    return path


def test_load_function_names_what_the_file_defines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        from fal_serverless import isolated
        import helper  # a module beside the file is importable, as under `python app.py`

        @isolated(serve=True)
        def web():
            return helper.VALUE

        def plain():
            pass

        if __name__ == "__main__":
            raise SystemExit("the main guard must not run")
        """,
    )
    (tmp_path / "helper.py").write_text("VALUE = 1\n")
    assert load_function(str(path), "web").func.__name__ == "web"
    with pytest.raises(FalServerlessError, match="'plain' is not an @isolated function .* are: web"):
        load_function(str(path), "plain")
    with pytest.raises(FalServerlessError, match="'nope' is not defined .* are: web"):
        load_function(str(path), "nope")
    with pytest.raises(FalServerlessError, match="no such file"):
        load_function(str(tmp_path / "missing.py"), "web")


def test_the_deploy_prints_revision_url_and_a_call() -> None:
    named = Deployment("r-1", "alice", "web", "http://h:1/apps/alice/web")
    lines = describe(named, "private")
    assert lines[0] == "Registered a new revision for function 'web' (revision='r-1')."
    assert lines[1] == "URL: http://h:1/apps/alice/web"
    assert 'curl -X POST http://h:1/apps/alice/web -H "Authorization: Key $FAL_KEY_ID:$FAL_KEY_SECRET"' in lines[3]
    anonymous = Deployment("r-2", "alice", None, "http://h:1/apps/alice/r-2")
    lines = describe(anonymous, "public")
    assert lines[0] == "Registered anonymous function 'r-2'."
    assert "Authorization" not in lines[3]


def test_function_serve_runs_the_file_in_python_and_reports_its_errors(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        from fal_serverless import isolated

        @isolated()
        def not_served():
            pass
        """,
    )
    env = script_env({"FAL_HOST": "127.0.0.1:1", "FAL_KEY_ID": "x", "FAL_KEY_SECRET": "y"})
    proc = subprocess.run(
        [FAL_SERVERLESS, "fn", "serve", str(path), "not_served", "--alias", "web"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc
    assert "error: " in proc.stderr and "not a web endpoint: set serve=True" in proc.stderr, proc.stderr
    proc = subprocess.run(
        [FAL_SERVERLESS, "function", "serve", str(path), "not_served", "--auth", "open"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "possible values: private, public, shared" in proc.stderr, proc.stderr


MODEL_SCRIPT = """
import sys
from pydantic import BaseModel, Field, PrivateAttr, validator
from fal_serverless._serialization import dump_call


class Item(BaseModel):
    name: str


class Order(BaseModel):
    '''An order.'''

    item: Item
    count: int = Field(1, ge=1)
    note: str = "none"
    _secret: int = PrivateAttr(5)

    class Config:
        extra = "forbid"

    @validator("note")
    def shout(cls, value):
        return value.upper()

    def total(self):
        return self.count * 10 + self._secret


def take(order: Order) -> int:
    return order.total()


sys.stdout.buffer.write(dump_call(take, (Order(item=Item(name="pen"), count=2),), {}).payload)
"""

LOAD_SCRIPT = """
import pickle, sys
sys.modules["fal_serverless"] = None  # as in a worker: the package is not there
fn, args, kwargs = pickle.loads(sys.stdin.buffer.read())
Order = fn.__annotations__["order"]
print(fn(*args), Order.__doc__, Order(item={"name": "x"}, note="hi").note)
for bad in ({"item": {"name": "x"}, "count": 0}, {"item": {"name": "x"}, "other": 1}, {}):
    try:
        Order(**bad)
    except Exception as error:
        print(type(error).__name__, len(error.errors()))
"""


def test_pydantic_1_models_of_the_script_travel_as_their_definition() -> None:
    """A web endpoint's JSON body is a pydantic model (FastAPI 0.99.1 takes pydantic 1): one defined in the user's
    script is rebuilt in the worker with its fields, defaults, constraints, validators, Config and methods."""
    import pydantic  # pydantic 1, from the test extras: what FastAPI 0.99.1 (serve=True) takes

    assert pydantic.VERSION.startswith("1."), f"the test extras pin pydantic 1, found {pydantic.VERSION}"
    made = subprocess.run([sys.executable, "-c", MODEL_SCRIPT], capture_output=True, timeout=60)
    assert made.returncode == 0, made.stderr.decode()
    loaded = subprocess.run([sys.executable, "-c", LOAD_SCRIPT], input=made.stdout, capture_output=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr.decode()
    assert loaded.stdout.decode().splitlines() == [
        "25 An order. HI",
        "ValidationError 1",
        "ValidationError 1",
        "ValidationError 1",
    ]
