// The example function fnmesh's quickstart and tests call.
include "base.thrift"

namespace rs echo
namespace go echo

struct EchoRequest {
    1: required string message,
    // Milliseconds the function sleeps before replying (tests use it for deadlines).
    2: optional i64 sleep_ms,
    3: optional base.Meta meta,
}

struct EchoResponse {
    1: required string message,
    2: optional string instance,
}

service EchoService {
    EchoResponse Echo(1: EchoRequest req) throws (1: base.FunctionError err),
    oneway void Ping(1: string note),
}
