"""Wire compatibility: our server, called through the original isolate-proto 0.0.37 stubs (grpcio, PyPI), in a
virtualenv of their own. Proves the package, service, message names and field numbers match, not just our copy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import Server

ORIGINAL_CLIENT = """
import sys, cloudpickle, grpc
from google.protobuf import struct_pb2
import isolate_proto as pb  # re-exports isolate's common and server messages beside the controller's
from isolate_proto import controller_pb2_grpc as rpc

host, key_id, key_secret, python = sys.argv[1:5]
stub = rpc.IsolateControllerStub(grpc.insecure_channel(host))
auth = [("auth-key-id", key_id), ("auth-key", key_secret)]

created = stub.CreateUserKey(pb.CreateUserKeyRequest(scope=pb.CreateUserKeyRequest.Scope.API, alias="wire"),
                             metadata=auth)
listed = stub.ListUserKeys(pb.ListUserKeysRequest(), metadata=auth)
print("keys", created.key_id in [k.key_id for k in listed.user_keys])

configuration = struct_pb2.Struct()
configuration.update({"requirements": [], "python_version": python,
                      "serializer": "cloudpickle==" + cloudpickle.__version__})
run = pb.HostedRun(
    environments=[pb.EnvironmentDefinition(kind="virtualenv", configuration=configuration)],
    machine_requirements=pb.MachineRequirements(machine_type="XS", keep_alive=5),
    function=pb.SerializedObject(method="cloudpickle",
                                 definition=cloudpickle.dumps((lambda x: print("hi from", x) or x * 2, (21,), {}))),
)
logs, result = [], None
for message in stub.Run(run, metadata=auth):
    logs += [log.message for log in message.logs]
    if message.HasField("return_value"):
        result = message.return_value
print("logs", "hi from 21" in logs)
print("result", result.method, result.was_it_raised, cloudpickle.loads(result.definition))
print("workers", len(stub.WorkerStatusList(pb.WorkerStatusListRequest(), metadata=auth).worker_status) >= 1)
stub.RevokeUserKey(pb.RevokeUserKeyRequest(key_id=created.key_id), metadata=auth)
try:
    stub.ListUserKeys(pb.ListUserKeysRequest(), metadata=[("auth-key-id", "nope"), ("auth-key", "nope")])
except grpc.RpcError as error:
    print("refused", error.code().name)
"""


def test_the_original_isolate_proto_stubs_speak_to_our_server(server: Server, original_stubs: Path) -> None:
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    proc = subprocess.run(
        [str(original_stubs), "-c", ORIGINAL_CLIENT, server.host, server.admin_id, server.admin_secret, python],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "keys True",
        "logs True",
        "result cloudpickle False 42",
        "workers True",
        "refused UNAUTHENTICATED",
    ]
