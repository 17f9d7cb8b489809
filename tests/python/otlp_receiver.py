"""An OTLP trace receiver for fnmesh's trace tests, built on the official opentelemetry-proto
package: OTLP/gRPC on GRPC_PORT and OTLP/HTTP (protobuf, POST /v1/traces) on HTTP_PORT. Each span
received is appended to OUT as a JSON line: trace_id, span_id, parent_span_id (hex), name,
kind, service (the resource's service.name) and attributes.

usage: otlp_receiver.py GRPC_PORT HTTP_PORT OUT
"""
import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

port, http_port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
lock = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def record(request, via):
    lines = []
    for rs in request.resource_spans:
        service = next((value(a.value) for a in rs.resource.attributes if a.key == "service.name"), None)
        for ss in rs.scope_spans:
            for s in ss.spans:
                lines.append(json.dumps({
                    "via": via,
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "name": s.name,
                    "kind": s.kind,
                    "service": service,
                    "attributes": {a.key: value(a.value) for a in s.attributes},
                }))
    with lock, open(out, "a") as f:
        for line in lines:
            f.write(line + "\n")


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        record(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


class Http(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path != "/v1/traces":
            self.send_response(404)
            self.end_headers()
            return
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        record(request, "http")
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
server.add_insecure_port(f"127.0.0.1:{port}")
server.start()
http = ThreadingHTTPServer(("127.0.0.1", http_port), Http)
threading.Thread(target=http.serve_forever, daemon=True).start()
print("ready", flush=True)
server.wait_for_termination()
