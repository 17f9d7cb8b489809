"""thriftpy2 (an independent Thrift implementation that loads an IDL at run time) against
fnmesh's JSON codec in the Compact protocol, with idl/tests/thrift/types.thrift.

`types_compact_server.py PORT`: the Types service, Compact over Framed transport, on
127.0.0.1:PORT. Roundtrip answers the struct it got (or throws Oops when `s` is "oops"); Two
answers a + len(b).

`types_compact_server.py decode HEX`: decodes HEX, a Compact `All` struct, and prints it as JSON
in fnmesh's mapping (docs/json.md), so a test can compare what thriftpy2 read with what was
meant (a round trip alone would hide a mistake made the same way both ways)."""
import base64
import json
import os
import sys

import thriftpy2
from thriftpy2.protocol import TCompactProtocolFactory
from thriftpy2.rpc import make_server
from thriftpy2.thrift import TType
from thriftpy2.transport import TFramedTransportFactory, TMemoryBuffer

here = os.path.dirname(os.path.abspath(__file__))
idl = os.path.join(here, "..", "..", "idl", "tests", "thrift", "types.thrift")
types = thriftpy2.load(idl, module_name="types_thrift")


class Handler:
    def Roundtrip(self, all):
        if all.s == "oops":
            raise types.Oops(code=all.i32v, why="asked for")
        return all

    def Nothing(self):
        return None

    def Two(self, a, b):
        return a + len(b)


def to_json(ttype, arg, v):
    """`v`, of Thrift type `ttype` (with `arg` as thriftpy2's spec gives it), as fnmesh maps it."""
    if ttype == TType.STRUCT:
        out = {}
        for spec in arg.thrift_spec.values():
            value = getattr(v, spec[1])
            if value is not None:
                out[spec[1]] = to_json(spec[0], spec[2] if len(spec) == 4 else None, value)
        return out
    if ttype in (TType.LIST, TType.SET):
        et, earg = arg if isinstance(arg, tuple) else (arg, None)
        return [to_json(et, earg, x) for x in v]
    if ttype == TType.MAP:
        (kt, karg), (vt, varg) = [a if isinstance(a, tuple) else (a, None) for a in arg]
        string_keys = kt == TType.STRING or (kt == TType.I32 and karg is not None)
        if string_keys:
            return {to_json(kt, karg, k): to_json(vt, varg, x) for k, x in v.items()}
        return [[to_json(kt, karg, k), to_json(vt, varg, x)] for k, x in v.items()]
    if ttype == TType.I32 and arg is not None:  # an enum: by name when declared
        return arg._VALUES_TO_NAMES.get(v, v)
    if ttype == 18:  # binary (thriftpy2's own type id for it)
        return base64.b64encode(v).decode()
    return v


if sys.argv[1] == "decode":
    buf = TMemoryBuffer(bytes.fromhex(sys.argv[2]))
    all = types.All()
    TCompactProtocolFactory().get_protocol(buf).read_struct(all)
    print(json.dumps(to_json(TType.STRUCT, types.All, all)))
    sys.exit(0)

server = make_server(
    types.Types,
    Handler(),
    "127.0.0.1",
    int(sys.argv[1]),
    proto_factory=TCompactProtocolFactory(),
    trans_factory=TFramedTransportFactory(),
)
server.serve()
