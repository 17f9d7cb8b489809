// Types shared by the example functions.
namespace rs base
namespace go base

struct Meta {
    1: optional string caller,
    2: optional map<string, string> tags,
}

exception FunctionError {
    1: required i32 code,
    2: required string reason,
}
