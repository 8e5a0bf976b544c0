"""The original client: fal-serverless 0.6.41, unmodified from PyPI in a virtualenv of its own, against our server.

It is pointed at us the way its code allows: `ISOLATE_TEST_MODE=1` (a plaintext loopback channel), `FAL_HOST`, which
must start with `api` (so each of its processes runs in a mount namespace of its own where `/etc/hosts` names
`api.fal-serverless.test` as 127.0.0.1; the machine's own file is untouched), and a key our CLI made. It pickles with
dill, which the server serves from its dill layer.
"""

from __future__ import annotations

import itertools
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
from conftest import EXAMPLES, Server, script_env, start_server, venv_with

VERSION = "fal-serverless==0.6.41"
HOSTNAME = "api.fal-serverless.test"

# Runs "$@" with /etc/hosts replaced by "$0", in user and mount namespaces of its own (no root needed).
WITH_HOSTS = 'mount --bind "$0" /etc/hosts && exec "$@"'
_scripts = itertools.count()


@dataclass
class OriginalClient:
    python: Path
    hosts: Path
    server: Server
    key: Tuple[str, str]

    def env(self, port_apart: bool = False) -> Dict[str, str]:
        port = self.server.host.rsplit(":", 1)[1]
        return script_env(
            {
                "ISOLATE_TEST_MODE": "1",
                # Its SDK takes host:port in FAL_HOST; its CLI takes the port from FAL_PORT.
                "FAL_HOST": HOSTNAME if port_apart else f"{HOSTNAME}:{port}",
                "FAL_PORT": port,
                "FAL_KEY_ID": self.key[0],
                "FAL_KEY_SECRET": self.key[1],
            }
        )

    def _run(self, argv: List[str], env: Dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
        command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", WITH_HOSTS, str(self.hosts), *argv]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)

    def script(self, source: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Runs `source` as a script file (its functions' source must be readable: `@cached` hashes it) with the
        original client's Python; fails the test if it fails."""
        path = self.hosts.with_name(f"script-{next(_scripts)}.py")
        path.write_text(source)
        proc = self._run([str(self.python), str(path)], self.env(), timeout)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def cli(self, *args: str, key: Optional[Tuple[str, str]] = None) -> subprocess.CompletedProcess[str]:
        """Runs the original `fal-serverless` command."""
        env = self.env(port_apart=True)
        if key:
            env.update(FAL_KEY_ID=key[0], FAL_KEY_SECRET=key[1])
        return self._run([str(self.python.with_name("fal-serverless")), *args], env, 60)


@pytest.fixture(scope="module")
def original(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginalClient]:
    # pyjokes too: one test's script imports it on the client's side.
    python = venv_with(tmp_path_factory, "fal-serverless-0.6.41", VERSION, "pyjokes")
    hosts = tmp_path_factory.mktemp("hosts") / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {HOSTNAME}\n")
    yield OriginalClient(python, hosts, server, server.create_key("original-client"))


# Calls every isolated function a script defined, printing `name -> result`.
CALL_EACH = """
from fal_serverless.api import IsolatedFunction as _IsolatedFunction
for _name, _function in list(globals().items()):
    if isinstance(_function, _IsolatedFunction):
        print(_name, "->", _function())
"""


def reference_example(name: str) -> str:
    """The reference's example as examples/reference holds it, without our own `run it` part, in 0.6.41's names."""
    source = (EXAMPLES / name).read_text().split("# --- run it ---")[0]
    return source.replace("CloudKeyCredentials", "FalServerlessKeyCredentials") + CALL_EACH


@pytest.mark.parametrize(
    "example, expected",
    [
        ("01_isolated.py", ["my_function -> Hello World"]),
        ("02_requirements.py", ["my_function -> "]),
        ("03_machine_type.py", ["my_function -> ", "my_function_L -> "]),
        # `.on(local)` runs in the original's own local isolate; `.on(cloud, machine_type="M")` on our server.
        (
            "04_local.py",
            ["my_function -> ", "my_function_local -> ", "my_function_cloud -> ", "my_function_local2 -> "],
        ),
        ("06_keep_alive.py", ["get_joke -> "]),
        (
            "07_cached.py",
            ["The result is: Hello, World!", "The result is: Hello, World!", "my_isolated_function -> The result is"],
        ),
    ],
)
def test_the_reference_examples_run_through_the_original_client(
    original: OriginalClient, example: str, expected: List[str]
) -> None:
    lines = original.script(reference_example(example)).stdout.splitlines()
    results = [line for line in lines if "->" in line or line.startswith("The result is")]
    assert len(results) == len(expected), lines
    for line, start in zip(results, expected):
        assert line.startswith(start), lines
        assert line.split("->")[-1].strip(), f"{line!r} shows no result"


CREDENTIALS = """
import os
from fal_serverless import FalServerlessHost, FalServerlessKeyCredentials, isolated

keys = [("your-key-id", "your-key-secret"), (os.environ["FAL_KEY_ID"], os.environ["FAL_KEY_SECRET"])]
for key_id, key_secret in keys:
    credentials = FalServerlessKeyCredentials(key_id=key_id, key_secret=key_secret)

    @isolated(host=FalServerlessHost(credentials=credentials))
    def my_function():
        return "hello world"

    try:
        print(my_function())
    except Exception as error:
        print("refused:", type(error).__name__, error)
"""


def test_credentials_the_way_the_original_client_takes_them(original: OriginalClient) -> None:
    # 0.6.41's isolated() has no `credentials` option (it would put the object into the environment definition and
    # fail in protobuf before sending anything); its hosts take them.
    lines = original.script(CREDENTIALS).stdout.splitlines()
    assert lines[0].startswith('refused: FalServerlessError key id "your-key-id" is not known to this server'), lines
    assert lines[1] == "hello world", lines


BEHAVIOUR = """
import time
import traceback

import pyjokes  # here only; the function below forgets to require it

from fal_serverless import cached, isolated

@isolated()
def talks():
    print("hello from the worker")
    return 42

@isolated()
def fails(x):
    raise ValueError(f"bad {x}")

@isolated(keep_alive=2)
def counts():
    import sys
    sys.calls = getattr(sys, "calls", 0) + 1
    return sys.calls

@cached
def first_run():
    return time.time()

@isolated(keep_alive=10)
def remembers():
    return first_run()

@isolated()
def forgets_a_requirement():
    return pyjokes.get_joke()

@isolated()
def returns_a_generator():
    return (i for i in range(3))

@isolated(machine_type="XXL")
def on_an_unknown_machine_type():
    return 1

print("result", talks())
try:
    fails(3)
except ValueError as error:
    print("raised", repr(error))
    print("".join(traceback.format_exception(type(error), error, error.__traceback__)))
print("counts", counts(), counts())
time.sleep(3)
print("counts after keep_alive", counts())
print("cached", remembers() == remembers())
for function in (forgets_a_requirement, returns_a_generator, on_an_unknown_machine_type):
    try:
        function()
    except Exception as error:
        print("error", type(error).__name__, str(error).replace("\\n", " "))
print("still serving", talks())
"""


def test_logs_exceptions_reuse_and_errors_through_the_original_client(original: OriginalClient) -> None:
    out = original.script(BEHAVIOUR).stdout
    # Its log printer shows what the function printed, as the call runs.
    assert "hello from the worker" in out
    assert "result 42" in out
    # The exception is the function's own, with the remote frames attached.
    assert "raised ValueError('bad 3')" in out
    assert 'raise ValueError(f"bad {x}")' in out and ", in fails" in out
    # keep_alive: the second call reused the warm worker; after keep_alive a fresh one ran.
    assert "counts 1 2" in out
    assert "counts after keep_alive 1" in out
    assert "cached True" in out
    errors = [line for line in out.splitlines() if line.startswith("error ")]
    assert len(errors) == 3, out
    # The client's own hint, which it gives when the server says the function could not be deserialized.
    assert "Couldn't deserialize your function on the remote server" in errors[0]
    assert "'pyjokes' (accessed through 'pyjokes')" in errors[0]
    assert errors[1].startswith("error TypeError the function's result could not be pickled with dill"), errors[1]
    assert 'unknown machine type "XXL"; valid machine types are: XS, S, M' in errors[2], errors[2]
    assert "still serving 42" in out


def test_the_original_key_commands(original: OriginalClient) -> None:
    generated = original.cli("key", "generate", "--scope", "API", "--alias", "from-the-original")
    assert generated.returncode == 0, generated.stdout + generated.stderr
    values = dict(line.split("=", 1) for line in generated.stdout.splitlines() if line.startswith("FAL_KEY_"))
    key_id, key_secret = values["FAL_KEY_ID"].strip("'"), values["FAL_KEY_SECRET"].strip("'")

    listed = original.cli("key", "list")
    assert listed.returncode == 0, listed.stderr
    assert key_id in listed.stdout and "from-the-original" in listed.stdout

    # The new key works, for the user who made it.
    assert original.cli("key", "list", key=(key_id, key_secret)).returncode == 0

    revoked = original.cli("key", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    assert key_id not in original.cli("key", "list").stdout
    # The original CLI prints an error and exits 0; what matters is that the server refused, saying why.
    refused = original.cli("key", "list", key=(key_id, key_secret))
    assert "has been revoked" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    assert "from-the-original" not in refused.stdout


def test_the_original_key_commands_meet_the_servers_cap_of_keys(original: OriginalClient) -> None:
    capped = start_server(config="[limits]\nmax_keys_per_user = 2\n")
    try:
        client = OriginalClient(original.python, original.hosts, capped, capped.create_key("original-capped"))
        generated = client.cli("key", "generate", "--scope", "API")
        assert generated.returncode == 0 and "FAL_KEY_ID" in generated.stdout, generated.stdout + generated.stderr
        refused = client.cli("key", "generate", "--scope", "API")
        # Its CLI wraps what it prints (rich): compared word by word.
        said = " ".join((refused.stdout + refused.stderr).split())
        assert "FAL_KEY_ID" not in refused.stdout, said
        assert 'user "original-capped" already has 2 keys, the most this server allows per user' in said, said
        assert "fal-serverless keys revoke KEY_ID" in said, said
    finally:
        capped.stop()


NESTED = """
from fal_serverless import isolated

@isolated()
def inner(x):
    import os
    return x * 2, os.environ["FAL_KEY_ID"][:7]

# Its own worker needs the client to call with: the original's package, from PyPI.
@isolated(requirements=["fal-serverless==0.6.41"])
def outer():
    import os
    return inner(21), os.environ["FAL_KEY_ID"][:7]

print("nested ->", outer())
"""


def test_a_function_calls_another_through_the_original_client(original: OriginalClient) -> None:
    # Inside its worker the original client finds the host it was called with (pickled with the function; the
    # worker's /etc/hosts names it) and the worker's key (FAL_KEY_ID with IS_ISOLATE_AGENT).
    lines = original.script(NESTED, timeout=600).stdout.splitlines()
    assert "nested -> ((42, 'worker-'), 'worker-')" in lines, lines


SETUP_AND_SUBMIT = """
import concurrent.futures, uuid
from fal_serverless import isolated

def load_model():
    print("setup ran")
    return uuid.uuid4().hex

@isolated(setup_function=load_model, keep_alive=30)
def predict(model, x):
    return model, x * 2

results = [predict(i) for i in range(3)]
print("values", [x for _, x in results])
print("models", len({model for model, _ in results}))

def broken():
    print("broken setup")
    raise RuntimeError("no weights")

@isolated(setup_function=broken, keep_alive=30)
def uses_broken(model):
    return model

for _ in range(2):
    try:
        uses_broken()
    except RuntimeError as error:
        print("setup raised", error)

# One at a time: 0.6.41 pickles each submitted call with dill on its pool's thread, and dill is not thread-safe (with
# four at once its script sometimes ends early, its stdout holding a disassembly, before any call is sent).
futures = []
for i in range(4):
    futures.append(predict.submit(i))
    futures[-1].result()
assert all(isinstance(f, concurrent.futures.Future) for f in futures)
print("submitted", sorted(f.result()[1] for f in futures))

@isolated(requirements=["dill==0.3.2"])
def pinned():
    return 1

try:
    pinned()
except Exception as error:
    print("pin refused", type(error).__name__, str(error).replace("\\n", " "))
"""


def test_setup_function_submit_and_a_dill_pin_through_the_original_client(original: OriginalClient) -> None:
    proc = original.script(SETUP_AND_SUBMIT)
    out = proc.stdout
    assert "values [0, 2, 4]" in out, out + proc.stderr
    # Once per warm worker: every call got the first run's result, and the submitted calls ran on that worker too.
    assert out.count("setup ran") == 1 and "models 1" in out, out
    # A setup that raises fails the call with its exception, and runs again on the next call.
    assert out.count("setup raised no weights") == 2 and out.count("broken setup") == 2, out
    assert "The setup function has thrown an error. Aborting the run." in out + proc.stderr
    assert "submitted [0, 2, 4, 6]" in out, out
    refused = [line for line in out.splitlines() if line.startswith("pin refused")]
    assert refused, out
    assert 'requirement "dill==0.3.2" would replace the dill==0.3.7' in refused[0], refused[0]
