#!/usr/bin/env python3
"""An fnmesh gRPC function: a plain grpcio server of echo.Echo (idl/proto/echo.proto).

It knows nothing of fnmesh beyond the process contract: listen on 127.0.0.1:$PORT. The stubs
(echo_pb2, echo_pb2_grpc) are generated from the proto, into this folder or onto PYTHONPATH:

    python3 -m grpc_tools.protoc -I idl/proto --python_out=examples/grpc-python \
        --grpc_python_out=examples/grpc-python idl/proto/echo.proto
"""
import os
import time
from concurrent import futures

import grpc

import echo_pb2
import echo_pb2_grpc


class Echo(echo_pb2_grpc.EchoServicer):
    def UnaryEcho(self, request, context):
        if request.sleep_ms:
            time.sleep(request.sleep_ms / 1000)
        return echo_pb2.EchoResponse(
            message=request.message,
            instance=os.environ.get("FNMESH_INSTANCE", ""),
        )


def main():
    # As many threads as the function's `scale.concurrency`: that many streams come at once.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{os.environ['PORT']}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
