"""gRPC calls to the example echo function (idl/proto/echo.proto) with Python grpcio, an
independent gRPC implementation. Messages are encoded by hand (two fields), so no generated code
or protoc is needed; health checks use grpcio-health-checking's stub.

usage: grpc_echo_client.py PORT unary MESSAGE
       grpc_echo_client.py PORT stream MESSAGE
       grpc_echo_client.py PORT deadline SLEEP_MS TIMEOUT_S
       grpc_echo_client.py PORT check SERVICE
       grpc_echo_client.py PORT watch SERVICE      (prints each status as it arrives)
       grpc_echo_client.py PORT repeat N           (N unary calls on one channel; prints "N ok")
       grpc_echo_client.py PORT traced TRACEPARENT (a unary call carrying it; prints the
                                                    traceparent the function received)
Each prints one line per result; errors print "error CODE_NAME message".
"""
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_request(message, sleep_ms=0):
    m = message.encode()
    out = b"\x0a" + varint(len(m)) + m
    if sleep_ms:
        out += b"\x10" + varint(sleep_ms)
    return out


def decode_response(data):
    fields, i = {}, 0
    while i < len(data):
        tag = data[i]
        i += 1
        n, shift = 0, 0
        while True:
            b = data[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        fields[tag >> 3] = data[i:i + n].decode()
        i += n
    return fields.get(1, ""), fields.get(2, "")


def main():
    port, mode = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    ident = lambda b: b
    try:
        if mode == "unary":
            call = channel.unary_unary("/echo.Echo/UnaryEcho", ident, decode_response)
            msg, inst = call(encode_request(sys.argv[3]), timeout=10)
            print(f"{msg} {inst}")
        elif mode == "traced":
            call = channel.unary_unary("/echo.Echo/UnaryEcho", ident, decode_response)
            _, meta = call.with_call(
                encode_request("traced"), timeout=10, metadata=(("traceparent", sys.argv[3]),)
            )
            seen = dict(meta.initial_metadata()).get("x-traceparent", "")
            print(seen)
        elif mode == "repeat":
            call = channel.unary_unary("/echo.Echo/UnaryEcho", ident, decode_response)
            n = int(sys.argv[3])
            for _ in range(n):
                call(encode_request("benchmark"), timeout=10)
            print(f"{n} ok")
        elif mode == "stream":
            call = channel.unary_stream("/echo.Echo/ServerStreamingEcho", ident, decode_response)
            for msg, inst in call(encode_request(sys.argv[3]), timeout=10):
                print(f"{msg} {inst}")
        elif mode == "deadline":
            call = channel.unary_unary("/echo.Echo/UnaryEcho", ident, decode_response)
            start = time.monotonic()
            try:
                call(encode_request("slow", int(sys.argv[3])), timeout=float(sys.argv[4]))
                print("no error")
            except grpc.RpcError as e:
                print(f"error {e.code().name} {time.monotonic() - start:.3f}")
        elif mode == "check":
            stub = health_pb2_grpc.HealthStub(channel)
            r = stub.Check(health_pb2.HealthCheckRequest(service=sys.argv[3]), timeout=10)
            print(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
        elif mode == "watch":
            stub = health_pb2_grpc.HealthStub(channel)
            for r in stub.Watch(health_pb2.HealthCheckRequest(service=sys.argv[3]), timeout=20):
                print(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status), flush=True)
            print("end", flush=True)
        else:
            sys.exit(f"unknown mode {mode}")
    except grpc.RpcError as e:
        print(f"error {e.code().name} {e.details()}", flush=True)


if __name__ == "__main__":
    main()
