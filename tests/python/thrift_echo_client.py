"""Calls EchoService.Echo with Apache Thrift's Python library (PyPI `thrift`), the way code
generated from idl/thrift/echo.thrift would: one call per line of output.

usage: thrift_echo_client.py PORT MESSAGE [--transport framed|buffered] [--multiplexed SERVICE]
                             [--compact] [--calls N]
Prints `ok <message> <instance>` or `exception <type> <message>` for each call.
"""
import argparse
import sys

from thrift.Thrift import TApplicationException, TMessageType, TType
from thrift.protocol import TBinaryProtocol, TCompactProtocol, TMultiplexedProtocol
from thrift.transport import TSocket, TTransport


def write_echo(proto, seqid, message):
    proto.writeMessageBegin("Echo", TMessageType.CALL, seqid)
    proto.writeStructBegin("EchoService_Echo_args")
    proto.writeFieldBegin("req", TType.STRUCT, 1)
    proto.writeStructBegin("EchoRequest")
    proto.writeFieldBegin("message", TType.STRING, 1)
    proto.writeString(message)
    proto.writeFieldEnd()
    proto.writeFieldStop()
    proto.writeStructEnd()
    proto.writeFieldEnd()
    proto.writeFieldStop()
    proto.writeStructEnd()
    proto.writeMessageEnd()
    proto.trans.flush()


def read_struct(proto, want):
    """Reads a struct; returns {field id: value} for the ids in `want` (a dict id -> nested
    `want` for structs, or None for a scalar), skipping the rest."""
    out = {}
    proto.readStructBegin()
    while True:
        _, ftype, fid = proto.readFieldBegin()
        if ftype == TType.STOP:
            break
        if fid in want and ftype == TType.STRUCT:
            out[fid] = read_struct(proto, want[fid] or {})
        elif fid in want and ftype == TType.STRING:
            out[fid] = proto.readString()
        else:
            proto.skip(ftype)
        proto.readFieldEnd()
    proto.readStructEnd()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("message")
    ap.add_argument("--transport", choices=["framed", "buffered"], default="framed")
    ap.add_argument("--multiplexed")
    ap.add_argument("--compact", action="store_true")
    ap.add_argument("--calls", type=int, default=1)
    args = ap.parse_args()

    sock = TSocket.TSocket("127.0.0.1", args.port)
    sock.setTimeout(10000)
    trans = (TTransport.TFramedTransport if args.transport == "framed" else TTransport.TBufferedTransport)(sock)
    proto = (TCompactProtocol.TCompactProtocol if args.compact else TBinaryProtocol.TBinaryProtocol)(trans)
    out_proto = TMultiplexedProtocol.TMultiplexedProtocol(proto, args.multiplexed) if args.multiplexed else proto
    trans.open()
    for seqid in range(1, args.calls + 1):
        write_echo(out_proto, seqid, f"{args.message} {seqid}")
        name, mtype, rseqid = proto.readMessageBegin()
        if rseqid != seqid:
            print(f"bad-seqid {rseqid} != {seqid}")
            return 1
        if mtype == TMessageType.EXCEPTION:
            e = TApplicationException()
            e.read(proto)
            proto.readMessageEnd()
            print(f"exception {e.type} {e.message}")
            continue
        result = read_struct(proto, {0: {1: None, 2: None}, 1: {}})
        proto.readMessageEnd()
        success = result.get(0)
        if success is None:
            print(f"declared-exception {result}")
            continue
        print(f"ok {success.get(1)} {success.get(2)}")
    trans.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
