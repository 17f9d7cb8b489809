"""HTTP/2 conformance of fnmesh's relay, driven from outside: the server cases of h2spec's list
(RFC 9113 and RFC 7541), each on its own connection. Valid requests and header blocks come from
the Python `h2` and `hpack` libraries (an independent implementation); the hostile frames are
written byte by byte, since `h2` refuses to send them.

usage: h2_conformance.py PORT
Prints one line per case: "ok ID: NAME" or "FAIL ID: NAME: WHY", then "cases ok N, failing M".
The echo function (idl/proto/echo.proto) must be configured: some cases need a stream the
instance keeps open (a unary call that sleeps).
"""
import socket
import struct
import sys
import time

import h2.config
import h2.connection
import hpack

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIO = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x5, 0x6
REFUSED_STREAM, COMPRESSION_ERROR = 0x7, 0x9
NAMES = {0x0: "NO_ERROR", 0x1: "PROTOCOL_ERROR", 0x2: "INTERNAL_ERROR", 0x3: "FLOW_CONTROL_ERROR",
         0x5: "STREAM_CLOSED", 0x6: "FRAME_SIZE_ERROR", 0x7: "REFUSED_STREAM", 0x8: "CANCEL",
         0x9: "COMPRESSION_ERROR", 0xb: "ENHANCE_YOUR_CALM"}
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PATH = "/echo.Echo/UnaryEcho"
WAIT = 3.0


class Failed(Exception):
    pass


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def settings(*pairs, ack=False):
    return frame(SETTINGS, ACK if ack else 0, 0, b"".join(struct.pack(">HI", i, v) for i, v in pairs))


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def grpc_message(text, sleep_ms=0):
    m = b"\x0a" + varint(len(text)) + text.encode()
    if sleep_ms:
        m += b"\x10" + varint(sleep_ms)
    return b"\x00" + struct.pack(">I", len(m)) + m


def request_fields(path=PATH, extra=()):
    return [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "fnmesh"),
            ("content-type", "application/grpc"), ("te", "trailers")] + list(extra)


class Conn:
    """One connection: a handshake, frames out, frames in."""

    def __init__(self, port, handshake=True):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.buf = b""
        self.encoder = hpack.Encoder()
        self.peer_settings = {}
        if handshake:
            self.send(PREFACE + settings())
            # The server's SETTINGS, then the ACK of ours (in either order with anything else).
            got_settings = got_ack = False
            while not (got_settings and got_ack):
                kind, flags, stream, payload = self.read()
                if kind == SETTINGS and flags & ACK:
                    got_ack = True
                elif kind == SETTINGS:
                    for i in range(0, len(payload), 6):
                        ident, value = struct.unpack(">HI", payload[i:i + 6])
                        self.peer_settings[ident] = value
                    self.send(settings(ack=True))
                    got_settings = True

    def send(self, data):
        self.sock.sendall(data)

    def block(self, fields):
        return self.encoder.encode(fields)

    def headers(self, stream, fields, flags=END_HEADERS):
        self.send(frame(HEADERS, flags, stream, self.block(fields)))

    def read(self):
        """The next frame, or None once the server has closed the connection."""
        deadline = time.monotonic() + WAIT
        while True:
            if len(self.buf) >= 9:
                n = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) >= 9 + n:
                    kind, flags = self.buf[3], self.buf[4]
                    stream = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
                    payload, self.buf = self.buf[9:9 + n], self.buf[9 + n:]
                    return kind, flags, stream, payload
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failed("no frame within %.0f s" % WAIT)
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise Failed("no frame within %.0f s" % WAIT)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buf += chunk

    def until(self, want, what):
        """Reads frames until `want(frame)` is true; fails on a close first."""
        while True:
            f = self.read()
            if f is None:
                raise Failed("connection closed while waiting for %s" % what)
            if want(f):
                return f

    def connection_error(self, codes):
        """GOAWAY with one of `codes` (the close after it is allowed)."""
        while True:
            f = self.read()
            if f is None:
                raise Failed("closed without GOAWAY (wanted %s)" % names(codes))
            kind, _, _, payload = f
            if kind == GOAWAY:
                code = struct.unpack(">I", payload[4:8])[0]
                if code not in codes:
                    raise Failed("GOAWAY %s, wanted %s" % (NAMES.get(code, code), names(codes)))
                return

    def stream_error(self, stream, codes):
        """RST_STREAM on `stream` with one of `codes`, or GOAWAY with one (an endpoint may treat a
        stream error as a connection error, RFC 9113 5.4)."""
        while True:
            f = self.read()
            if f is None:
                raise Failed("closed without RST_STREAM or GOAWAY (wanted %s)" % names(codes))
            kind, _, s, payload = f
            if kind == RST_STREAM and s == stream:
                code = struct.unpack(">I", payload)[0]
                if code not in codes:
                    raise Failed("RST_STREAM %s, wanted %s" % (NAMES.get(code, code), names(codes)))
                return
            if kind == GOAWAY:
                code = struct.unpack(">I", payload[4:8])[0]
                if code not in codes:
                    raise Failed("GOAWAY %s, wanted %s" % (NAMES.get(code, code), names(codes)))
                return

    def alive(self):
        """A PING is answered: the connection is still up (what was sent before was ignored)."""
        self.send(frame(PING, 0, 0, b"h2check!"))
        self.until(lambda f: f[0] == PING and f[1] & ACK and f[3] == b"h2check!", "the PING ACK")

    def response(self, stream):
        """Response HEADERS on `stream`."""
        self.until(lambda f: f[0] == HEADERS and f[2] == stream, "response HEADERS on stream %d" % stream)

    def closed(self):
        """The server closes the connection (with or without GOAWAY first)."""
        while True:
            f = self.read()
            if f is None:
                return

    def open_slow(self, stream, sleep_ms=1500):
        """A unary call the instance answers after `sleep_ms`: its request ended (END_STREAM),
        the response not begun: the stream is half-closed (remote)."""
        self.headers(stream, request_fields())
        self.send(frame(DATA, END_STREAM, stream, grpc_message("slow", sleep_ms)))


def names(codes):
    return "/".join(NAMES.get(c, str(c)) for c in codes)


def call_h2_library(port):
    """A whole unary call written by the `h2` library: the relay speaks what it speaks."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    c = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    c.send_headers(1, request_fields())
    c.send_data(1, grpc_message("via h2"), end_stream=True)
    sock.sendall(c.data_to_send())
    body, ended = b"", False
    while not ended:
        data = sock.recv(65536)
        if not data:
            raise Failed("closed before the response ended")
        for event in c.receive_data(data):
            name = type(event).__name__
            if name == "DataReceived":
                body += event.data
                c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif name == "StreamEnded":
                ended = True
            elif name in ("StreamReset", "ConnectionTerminated"):
                raise Failed("%s" % event)
        sock.sendall(c.data_to_send())
    if b"via h2" not in body:
        raise Failed("response body %r" % body)
    sock.close()


# ---- the cases: (h2spec id, name, function(conn) or ("raw", function(port))) ----------------------

CASES = []


def case(ident, name, handshake=True):
    def register(f):
        CASES.append((ident, name, f, handshake))
        return f
    return register


@case("generic/1", "a whole unary call from the Python h2 library", handshake=None)
def _(port):
    call_h2_library(port)


@case("3.5/1", "sends a client connection preface", handshake=True)
def _(c):
    c.alive()


@case("3.5/2", "sends an invalid connection preface", handshake=False)
def _(c):
    c.send(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + settings())
    c.closed()


@case("4.1/1", "sends a frame with an unknown type")
def _(c):
    c.send(frame(0x16, 0, 0, b"\x00" * 8))
    c.alive()


@case("4.1/2", "sends a frame with undefined flags")
def _(c):
    c.send(frame(PING, 0x16, 0, b"\x00" * 8))
    c.until(lambda f: f[0] == PING and f[1] & ACK, "the PING ACK")


@case("4.1/3", "sends a frame with the reserved bit set")
def _(c):
    c.headers(1, request_fields(), flags=END_HEADERS)
    c.send(frame(DATA, END_STREAM, 1 | 0x80000000, grpc_message("reserved")))
    c.response(1)


@case("4.2/1", "sends a DATA frame of 2^14 octets")
def _(c):
    c.headers(1, request_fields("/no.Such/Method"), flags=END_HEADERS)
    c.send(frame(DATA, END_STREAM, 1, b"\x00" * 16384))
    c.response(1)


@case("4.2/2", "sends a DATA frame over SETTINGS_MAX_FRAME_SIZE")
def _(c):
    c.headers(1, request_fields(), flags=END_HEADERS)
    c.send(frame(DATA, END_STREAM, 1, b"\x00" * 16385))
    c.stream_error(1, [FRAME_SIZE_ERROR])


@case("4.2/3", "sends a HEADERS frame over SETTINGS_MAX_FRAME_SIZE")
def _(c):
    # A real block, then zeros: one byte past the largest frame the server allows (it must
    # refuse the frame on its length, before any of the block is decoded).
    block = c.block(request_fields())
    size = c.peer_settings.get(5, 16384) + 1
    c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, block + b"\x00" * (size - len(block))))
    c.connection_error([FRAME_SIZE_ERROR])


@case("4.3/1", "sends an invalid header block fragment")
def _(c):
    c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x00\x05abc"))
    c.connection_error([COMPRESSION_ERROR])


@case("4.3/2", "sends a PRIORITY frame while sending the header blocks")
def _(c):
    block = c.block(request_fields())
    c.send(frame(HEADERS, END_STREAM, 1, block[:4]))
    c.send(frame(PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10"))
    c.connection_error([PROTOCOL_ERROR])


@case("4.3/3", "sends a HEADERS frame to another stream while sending the header blocks")
def _(c):
    block = c.block(request_fields())
    c.send(frame(HEADERS, END_STREAM, 1, block[:4]))
    c.send(frame(HEADERS, END_HEADERS | END_STREAM, 3, c.block(request_fields())))
    c.connection_error([PROTOCOL_ERROR])


@case("5.1/1", "idle: sends a DATA frame")
def _(c):
    c.send(frame(DATA, END_STREAM, 1, b"x"))
    c.connection_error([PROTOCOL_ERROR])


@case("5.1/2", "idle: sends a RST_STREAM frame")
def _(c):
    c.send(frame(RST_STREAM, 0, 1, struct.pack(">I", 8)))
    c.connection_error([PROTOCOL_ERROR])


@case("5.1/3", "idle: sends a WINDOW_UPDATE frame")
def _(c):
    c.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 100)))
    c.connection_error([PROTOCOL_ERROR])


@case("5.1/4", "idle: sends a CONTINUATION frame")
def _(c):
    c.send(frame(CONTINUATION, END_HEADERS, 1, c.block(request_fields())))
    c.connection_error([PROTOCOL_ERROR])


@case("5.1/5", "half closed (remote): sends a DATA frame")
def _(c):
    c.open_slow(1)
    c.send(frame(DATA, 0, 1, b"x"))
    c.stream_error(1, [STREAM_CLOSED])


@case("5.1/6", "half closed (remote): sends a HEADERS frame")
def _(c):
    c.open_slow(1)
    c.headers(1, [("x-trailer", "1")], flags=END_HEADERS | END_STREAM)
    c.stream_error(1, [STREAM_CLOSED])


@case("5.1/7", "half closed (remote): sends a CONTINUATION frame")
def _(c):
    c.open_slow(1)
    c.send(frame(CONTINUATION, END_HEADERS, 1, c.block([("x-trailer", "1")])))
    c.stream_error(1, [STREAM_CLOSED, PROTOCOL_ERROR])


@case("5.1/8", "closed: sends a DATA frame after sending RST_STREAM")
def _(c):
    c.headers(1, request_fields(), flags=END_HEADERS)
    c.send(frame(RST_STREAM, 0, 1, struct.pack(">I", 8)))
    c.send(frame(DATA, 0, 1, b"x"))
    c.stream_error(1, [STREAM_CLOSED])


@case("5.1/9", "closed: sends a HEADERS frame after sending RST_STREAM")
def _(c):
    c.headers(1, request_fields(), flags=END_HEADERS)
    c.send(frame(RST_STREAM, 0, 1, struct.pack(">I", 8)))
    c.headers(1, [("x-trailer", "1")], flags=END_HEADERS | END_STREAM)
    c.stream_error(1, [STREAM_CLOSED])


@case("5.1/10", "closed: sends a CONTINUATION frame after sending RST_STREAM")
def _(c):
    c.headers(1, request_fields(), flags=END_HEADERS)
    c.send(frame(RST_STREAM, 0, 1, struct.pack(">I", 8)))
    c.send(frame(CONTINUATION, END_HEADERS, 1, c.block([("x-trailer", "1")])))
    c.stream_error(1, [STREAM_CLOSED, PROTOCOL_ERROR])


@case("5.1/11", "closed: sends a DATA frame after the stream ended both ways")
def _(c):
    c.headers(1, request_fields("/no.Such/Method"), flags=END_HEADERS | END_STREAM)
    c.until(lambda f: f[2] == 1 and f[1] & END_STREAM, "the end of the response")
    c.send(frame(DATA, 0, 1, b"x"))
    c.stream_error(1, [STREAM_CLOSED])


@case("5.1/12", "closed: sends a HEADERS frame after the stream ended both ways")
def _(c):
    c.headers(1, request_fields("/no.Such/Method"), flags=END_HEADERS | END_STREAM)
    c.until(lambda f: f[2] == 1 and f[1] & END_STREAM, "the end of the response")
    c.headers(1, [("x-trailer", "1")], flags=END_HEADERS | END_STREAM)
    c.stream_error(1, [STREAM_CLOSED])


@case("5.1/13", "closed: sends a CONTINUATION frame after the stream ended both ways")
def _(c):
    c.headers(1, request_fields("/no.Such/Method"), flags=END_HEADERS | END_STREAM)
    c.until(lambda f: f[2] == 1 and f[1] & END_STREAM, "the end of the response")
    c.send(frame(CONTINUATION, END_HEADERS, 1, c.block([("x-trailer", "1")])))
    c.stream_error(1, [STREAM_CLOSED, PROTOCOL_ERROR])


@case("5.1.1/1", "sends a stream identifier that is numerically smaller than the previous")
def _(c):
    c.headers(5, request_fields("/no.Such/Method"), flags=END_HEADERS | END_STREAM)
    c.headers(3, request_fields("/no.Such/Method"), flags=END_HEADERS | END_STREAM)
    c.connection_error([PROTOCOL_ERROR])


@case("5.1.1/2", "sends an even-numbered stream identifier")
def _(c):
    c.headers(2, request_fields("/no.Such/Method"), flags=END_HEADERS | END_STREAM)
    c.connection_error([PROTOCOL_ERROR])


@case("5.1.2/1", "exceeds SETTINGS_MAX_CONCURRENT_STREAMS")
def _(c):
    most = c.peer_settings.get(3)
    if most is None or most > 5000:
        raise Failed("SETTINGS_MAX_CONCURRENT_STREAMS not announced (or over 5000): %r" % most)
    for i in range(most + 1):
        c.headers(1 + 2 * i, request_fields(), flags=END_HEADERS)
    last = 1 + 2 * most
    c.stream_error(last, [PROTOCOL_ERROR, REFUSED_STREAM])


@case("5.3.1/1", "sends a HEADERS frame that depends on itself")
def _(c):
    prio = struct.pack(">IB", 1, 16)
    c.send(frame(HEADERS, END_HEADERS | END_STREAM | PRIO, 1, prio + c.block(request_fields())))
    c.stream_error(1, [PROTOCOL_ERROR])


@case("5.3.1/2", "sends a PRIORITY frame that depends on itself")
def _(c):
    c.send(frame(PRIORITY, 0, 1, struct.pack(">IB", 1, 16)))
    c.stream_error(1, [PROTOCOL_ERROR])


@case("5.4.1/1", "sends an invalid PING frame for connection close")
def _(c):
    c.send(frame(PING, 0, 0, b"\x00" * 6))
    c.connection_error([FRAME_SIZE_ERROR])


@case("5.4.1/2", "sends an invalid PING frame to receive GOAWAY")
def _(c):
    c.send(frame(PING, 0, 0, b"\x00" * 6))
    c.connection_error([FRAME_SIZE_ERROR])
    c.closed()


@case("5.5/1", "sends an unknown extension frame")
def _(c):
    c.send(frame(0xFF, 0, 0, b"\x00" * 8))
    c.alive()


@case("5.5/2", "sends an unknown extension frame in the middle of a header block")
def _(c):
    block = c.block(request_fields())
    c.send(frame(HEADERS, END_STREAM, 1, block))
    c.send(frame(0xFF, 0, 1, b"\x00" * 8))
    c.connection_error([PROTOCOL_ERROR])


@case("6.1/1", "sends a DATA frame with 0x0 stream identifier")
def _(c):
    c.send(frame(DATA, END_STREAM, 0, b"x"))
    c.connection_error([PROTOCOL_ERROR])


@case("6.1/2", "sends a DATA frame on a stream not open or half-closed (local)")
def _(c):
    c.open_slow(1)
    c.send(frame(DATA, END_STREAM, 1, b"x"))
    c.stream_error(1, [STREAM_CLOSED])


@case("6.1/3", "sends a DATA frame with invalid pad length")
def _(c):
    c.headers(1, request_fields(), flags=END_HEADERS)
    c.send(frame(DATA, PADDED | END_STREAM, 1, b"\x06" + b"x" * 5))
    c.connection_error([PROTOCOL_ERROR])


@case("6.2/1", "sends a HEADERS frame without END_HEADERS, then a PRIORITY frame")
def _(c):
    c.send(frame(HEADERS, END_STREAM, 1, c.block(request_fields())))
    c.send(frame(PRIORITY, 0, 1, struct.pack(">IB", 0, 16)))
    c.connection_error([PROTOCOL_ERROR])


@case("6.2/2", "sends a HEADERS frame to another stream while sending a header block")
def _(c):
    c.send(frame(HEADERS, END_STREAM, 1, c.block(request_fields())))
    c.send(frame(HEADERS, END_HEADERS | END_STREAM, 3, c.block(request_fields())))
    c.connection_error([PROTOCOL_ERROR])


@case("6.2/3", "sends a HEADERS frame with 0x0 stream identifier")
def _(c):
    c.send(frame(HEADERS, END_HEADERS | END_STREAM, 0, c.block(request_fields())))
    c.connection_error([PROTOCOL_ERROR])


@case("6.2/4", "sends a HEADERS frame with invalid pad length")
def _(c):
    block = c.block(request_fields())
    c.send(frame(HEADERS, END_HEADERS | END_STREAM | PADDED, 1, bytes([len(block) + 1]) + block))
    c.connection_error([PROTOCOL_ERROR])


@case("6.3/1", "sends a PRIORITY frame with 0x0 stream identifier")
def _(c):
    c.send(frame(PRIORITY, 0, 0, struct.pack(">IB", 1, 16)))
    c.connection_error([PROTOCOL_ERROR])


@case("6.3/2", "sends a PRIORITY frame with a length other than 5 octets")
def _(c):
    c.open_slow(1)
    c.send(frame(PRIORITY, 0, 1, struct.pack(">I", 0)))
    c.stream_error(1, [FRAME_SIZE_ERROR])


@case("6.4/1", "sends a RST_STREAM frame with 0x0 stream identifier")
def _(c):
    c.send(frame(RST_STREAM, 0, 0, struct.pack(">I", 8)))
    c.connection_error([PROTOCOL_ERROR])


@case("6.4/2", "sends a RST_STREAM frame on an idle stream")
def _(c):
    c.send(frame(RST_STREAM, 0, 1, struct.pack(">I", 8)))
    c.connection_error([PROTOCOL_ERROR])


@case("6.4/3", "sends a RST_STREAM frame with a length other than 4 octets")
def _(c):
    c.open_slow(1)
    c.send(frame(RST_STREAM, 0, 1, b"\x00\x00\x08"))
    c.connection_error([FRAME_SIZE_ERROR])


@case("6.5/1", "sends a SETTINGS frame with ACK flag and payload")
def _(c):
    c.send(frame(SETTINGS, ACK, 0, struct.pack(">HI", 3, 100)))
    c.connection_error([FRAME_SIZE_ERROR])


@case("6.5/2", "sends a SETTINGS frame with a stream identifier other than 0x0")
def _(c):
    c.send(frame(SETTINGS, 0, 1, struct.pack(">HI", 3, 100)))
    c.connection_error([PROTOCOL_ERROR])


@case("6.5/3", "sends a SETTINGS frame with a length other than a multiple of 6 octets")
def _(c):
    c.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 3, 100)[:5]))
    c.connection_error([FRAME_SIZE_ERROR])


@case("6.5.2/1", "SETTINGS_ENABLE_PUSH: sends a value other than 0 or 1")
def _(c):
    c.send(settings((2, 2)))
    c.connection_error([PROTOCOL_ERROR])


@case("6.5.2/2", "SETTINGS_INITIAL_WINDOW_SIZE: sends a value above the maximum window size")
def _(c):
    c.send(settings((4, 2 ** 31)))
    c.connection_error([FLOW_CONTROL_ERROR])


@case("6.5.2/3", "SETTINGS_MAX_FRAME_SIZE: sends a value below the initial value")
def _(c):
    c.send(settings((5, 16383)))
    c.connection_error([PROTOCOL_ERROR])


@case("6.5.2/4", "SETTINGS_MAX_FRAME_SIZE: sends a value above the maximum allowed frame size")
def _(c):
    c.send(settings((5, 2 ** 24)))
    c.connection_error([PROTOCOL_ERROR])


@case("6.5.2/5", "sends a SETTINGS frame with an unknown identifier")
def _(c):
    c.send(settings((0xFF, 1)))
    c.until(lambda f: f[0] == SETTINGS and f[1] & ACK, "the SETTINGS ACK")


@case("6.5.3/2", "sends a SETTINGS frame without ACK flag")
def _(c):
    c.send(settings((3, 100)))
    c.until(lambda f: f[0] == SETTINGS and f[1] & ACK, "the SETTINGS ACK")


@case("6.7/1", "sends a PING frame")
def _(c):
    c.alive()


@case("6.7/2", "sends a PING frame with ACK")
def _(c):
    c.send(frame(PING, ACK, 0, b"unsolici"))
    c.send(frame(PING, 0, 0, b"h2check!"))
    kind, flags, _, payload = c.until(lambda f: f[0] == PING, "a PING")
    if payload != b"h2check!":
        raise Failed("answered a PING ACK with %r" % payload)


@case("6.7/3", "sends a PING frame with a stream identifier other than 0x0")
def _(c):
    c.send(frame(PING, 0, 1, b"\x00" * 8))
    c.connection_error([PROTOCOL_ERROR])


@case("6.7/4", "sends a PING frame with a length other than 8")
def _(c):
    c.send(frame(PING, 0, 0, b"\x00" * 6))
    c.connection_error([FRAME_SIZE_ERROR])


@case("6.8/1", "sends a GOAWAY frame with a stream identifier other than 0x0")
def _(c):
    c.send(frame(GOAWAY, 0, 1, struct.pack(">II", 0, 0)))
    c.connection_error([PROTOCOL_ERROR])


@case("6.9/1", "sends a WINDOW_UPDATE frame with an increment of 0")
def _(c):
    c.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)))
    c.connection_error([PROTOCOL_ERROR])


@case("6.9/2", "sends a WINDOW_UPDATE frame with an increment of 0 on a stream")
def _(c):
    c.open_slow(1)
    c.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 0)))
    c.stream_error(1, [PROTOCOL_ERROR])


@case("6.9/3", "sends a WINDOW_UPDATE frame with a length other than 4 octets")
def _(c):
    c.send(frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x01"))
    c.connection_error([FRAME_SIZE_ERROR])


@case("6.9.1/1", "sends SETTINGS_INITIAL_WINDOW_SIZE of 1 and gets DATA of 1 byte")
def _(c):
    c.send(settings((4, 1)))
    c.headers(1, request_fields(), flags=END_HEADERS)
    c.send(frame(DATA, END_STREAM, 1, grpc_message("window of one")))
    _, _, _, payload = c.until(lambda f: f[0] == DATA and f[2] == 1, "DATA on stream 1")
    if len(payload) != 1:
        raise Failed("DATA of %d bytes in a window of 1" % len(payload))


@case("6.9.1/2", "sends WINDOW_UPDATEs that take the connection window past 2^31-1")
def _(c):
    c.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2 ** 31 - 1)))
    c.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2 ** 31 - 1)))
    c.connection_error([FLOW_CONTROL_ERROR])


@case("6.9.1/3", "sends WINDOW_UPDATEs that take a stream window past 2^31-1")
def _(c):
    c.open_slow(1)
    c.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 2 ** 31 - 1)))
    c.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 2 ** 31 - 1)))
    c.stream_error(1, [FLOW_CONTROL_ERROR])


def data_of(c, size, what):
    """The next DATA on stream 1 is `size` bytes."""
    _, _, _, payload = c.until(lambda f: f[0] == DATA and f[2] == 1, what)
    if len(payload) != size:
        raise Failed("%s: DATA of %d bytes, wanted %d" % (what, len(payload), size))


@case("6.5.3/1", "sends multiple values of SETTINGS_INITIAL_WINDOW_SIZE (the last counts)")
def _(c):
    c.send(settings((4, 100), (4, 1)))
    c.headers(1, request_fields(), flags=END_HEADERS)
    c.send(frame(DATA, END_STREAM, 1, grpc_message("last value counts")))
    data_of(c, 1, "a window of 1")


@case("6.9.2/1", "changes SETTINGS_INITIAL_WINDOW_SIZE after sending HEADERS")
def _(c):
    c.send(settings((4, 0)))
    c.headers(1, request_fields(), flags=END_HEADERS)
    c.send(frame(DATA, END_STREAM, 1, grpc_message("window opened later")))
    c.send(settings((4, 1)))
    data_of(c, 1, "the window opened to 1")


@case("6.9.2/2", "sends a SETTINGS frame that makes a stream window negative")
def _(c):
    c.send(settings((4, 3)))
    c.headers(1, request_fields(), flags=END_HEADERS)
    c.send(frame(DATA, END_STREAM, 1, grpc_message("negative window")))
    data_of(c, 3, "a window of 3")
    # 3 sent in a window now 2: -1; a WINDOW_UPDATE of 2 leaves room for 1.
    c.send(settings((4, 2)))
    c.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 2)))
    data_of(c, 1, "a window of -1 + 2")


@case("6.9.2/3", "sends SETTINGS_INITIAL_WINDOW_SIZE over the maximum")
def _(c):
    c.send(settings((4, 2 ** 31)))
    c.connection_error([FLOW_CONTROL_ERROR])


@case("6.10/1", "sends multiple CONTINUATION frames")
def _(c):
    block = c.block(request_fields("/no.Such/Method"))
    c.send(frame(HEADERS, END_STREAM, 1, block[:3]))
    c.send(frame(CONTINUATION, 0, 1, block[3:6]))
    c.send(frame(CONTINUATION, END_HEADERS, 1, block[6:]))
    c.response(1)


@case("6.10/2", "sends a CONTINUATION frame followed by a non-CONTINUATION frame")
def _(c):
    block = c.block(request_fields())
    c.send(frame(HEADERS, END_STREAM, 1, block[:3]))
    c.send(frame(CONTINUATION, 0, 1, block[3:6]))
    c.send(frame(DATA, END_STREAM, 1, b"x"))
    c.connection_error([PROTOCOL_ERROR])


@case("6.10/3", "sends a CONTINUATION frame with 0x0 stream identifier")
def _(c):
    block = c.block(request_fields())
    c.send(frame(HEADERS, END_STREAM, 1, block[:3]))
    c.send(frame(CONTINUATION, END_HEADERS, 0, block[3:]))
    c.connection_error([PROTOCOL_ERROR])


@case("6.10/4", "sends a CONTINUATION frame after a HEADERS frame with END_HEADERS")
def _(c):
    c.open_slow(1)
    c.send(frame(CONTINUATION, END_HEADERS, 1, c.block([("x-more", "1")])))
    c.connection_error([PROTOCOL_ERROR])


@case("6.10/5", "sends a CONTINUATION frame after a CONTINUATION frame with END_HEADERS")
def _(c):
    block = c.block(request_fields())
    c.send(frame(HEADERS, 0, 1, block[:3]))
    c.send(frame(CONTINUATION, END_HEADERS, 1, block[3:]))
    c.send(frame(CONTINUATION, END_HEADERS, 1, c.block([("x-more", "1")])))
    c.connection_error([PROTOCOL_ERROR])


@case("6.10/6", "sends a CONTINUATION frame preceded by a DATA frame")
def _(c):
    c.headers(1, request_fields(), flags=END_HEADERS)
    c.send(frame(DATA, 0, 1, grpc_message("x")))
    c.send(frame(CONTINUATION, END_HEADERS, 1, c.block([("x-more", "1")])))
    c.connection_error([PROTOCOL_ERROR])


@case("8.1/1", "sends a second HEADERS frame without END_STREAM")
def _(c):
    c.headers(1, request_fields(), flags=END_HEADERS)
    c.headers(1, [("x-trailer", "1")], flags=END_HEADERS)
    c.stream_error(1, [PROTOCOL_ERROR])


def malformed(ident, name, fields, **kw):
    @case(ident, name)
    def _(c):
        c.headers(1, fields, flags=END_HEADERS | END_STREAM)
        c.stream_error(1, [PROTOCOL_ERROR])


malformed("8.1.2/1", "sends a HEADERS frame that contains a field name in uppercase letters",
          request_fields(extra=[("X-Test", "ok")]))
malformed("8.1.2.1/1", "sends a HEADERS frame that contains an unknown pseudo-header field",
          [(":test", "ok")] + request_fields())
malformed("8.1.2.1/2", "sends a HEADERS frame that contains the response pseudo-header field",
          [(":status", "200")] + request_fields())
malformed("8.1.2.1/4", "sends a HEADERS frame that contains a pseudo-header field after a regular one",
          request_fields() + [(":authority", "again")])
malformed("8.1.2.2/1", "sends a HEADERS frame that contains a connection-specific header field",
          request_fields(extra=[("connection", "keep-alive")]))
malformed("8.1.2.2/2", "sends a HEADERS frame that contains TE other than trailers",
          [f for f in request_fields() if f[0] != "te"] + [("te", "trailers, deflate")])
malformed("8.1.2.3/1", "sends a HEADERS frame with an empty :path",
          [(k, "" if k == ":path" else v) for k, v in request_fields()])
malformed("8.1.2.3/2", "sends a HEADERS frame without :method",
          [f for f in request_fields() if f[0] != ":method"])
malformed("8.1.2.3/3", "sends a HEADERS frame without :scheme",
          [f for f in request_fields() if f[0] != ":scheme"])
malformed("8.1.2.3/4", "sends a HEADERS frame without :path",
          [f for f in request_fields() if f[0] != ":path"])
malformed("8.1.2.3/5", "sends a HEADERS frame with a duplicated :method",
          [(":method", "POST")] + request_fields())
malformed("8.1.2.3/6", "sends a HEADERS frame with a duplicated :scheme",
          [(":scheme", "http")] + request_fields())
malformed("8.1.2.3/7", "sends a HEADERS frame with a duplicated :path",
          [(":path", PATH)] + request_fields())
malformed("8.2.1/1", "sends a HEADERS frame with CR/LF in a field value",
          request_fields(extra=[("x-test", "a\r\nb")]))


@case("8.1.2.1/3", "sends a HEADERS frame that contains a pseudo-header field as trailers")
def _(c):
    c.headers(1, request_fields(), flags=END_HEADERS)
    c.send(frame(DATA, 0, 1, grpc_message("x")))
    c.headers(1, [(":path", PATH)], flags=END_HEADERS | END_STREAM)
    c.stream_error(1, [PROTOCOL_ERROR])


@case("8.1.2.6/1", "sends a HEADERS frame with a content-length that DATA does not match")
def _(c):
    c.headers(1, request_fields(extra=[("content-length", "1")]), flags=END_HEADERS)
    c.send(frame(DATA, END_STREAM, 1, b"four"))
    c.stream_error(1, [PROTOCOL_ERROR])


@case("8.1.2.6/2", "sends multiple DATA frames that do not add up to content-length")
def _(c):
    c.headers(1, request_fields(extra=[("content-length", "8")]), flags=END_HEADERS)
    c.send(frame(DATA, 0, 1, b"four"))
    c.send(frame(DATA, END_STREAM, 1, b"x"))
    c.stream_error(1, [PROTOCOL_ERROR])


@case("8.2/1", "sends a PUSH_PROMISE frame")
def _(c):
    c.send(frame(PUSH_PROMISE, END_HEADERS, 1, struct.pack(">I", 2) + c.block(request_fields())))
    c.connection_error([PROTOCOL_ERROR])


def hpack_error(ident, name, block):
    @case(ident, name)
    def _(c):
        c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
        c.connection_error([COMPRESSION_ERROR])


# RFC 7541: header blocks that do not decode.
hpack_error("hpack/2.3.3/1", "sends an indexed header field with an index past the static table", b"\xbe")
hpack_error("hpack/2.3.3/2", "sends a literal field whose indexed name is past the tables", b"\x7f\x00\x01a")
hpack_error("hpack/4.2/1", "sends a dynamic table size update at the end of a header block",
            b"\x82\x86\x84\x3f\xe1\x1f")
# A literal field `x-test` whose value is Huffman-coded: 30 ones are the EOS symbol; 'a' (00011)
# then 11 bits of padding; 'a' then padding of zeros instead of the EOS prefix.
hpack_error("hpack/5.2/1", "sends a Huffman string literal with the EOS symbol",
            b"\x00\x06x-test\x84\xff\xff\xff\xff")
hpack_error("hpack/5.2/2", "sends a Huffman string literal padded by more than 7 bits",
            b"\x00\x06x-test\x82\x1f\xff")
hpack_error("hpack/5.2/3", "sends a Huffman string literal padded with zeros",
            b"\x00\x06x-test\x81\x18")
hpack_error("hpack/6.1/1", "sends an indexed header field with index 0", b"\x80")
hpack_error("hpack/6.3/1", "sends a dynamic table size update larger than the limit (4097)",
            b"\x3f\xe2\x1f\x82")


def run(port):
    passed = failed = 0
    for ident, name, f, handshake in CASES:
        try:
            if handshake is None:
                f(port)
            else:
                c = Conn(port, handshake=handshake)
                try:
                    f(c)
                finally:
                    c.sock.close()
            print("ok %s: %s" % (ident, name))
            passed += 1
        except (Failed, OSError) as e:
            print("FAIL %s: %s: %s" % (ident, name, e))
            failed += 1
        sys.stdout.flush()
    print("cases ok %d, failing %d" % (passed, failed))


if __name__ == "__main__":
    run(int(sys.argv[1]))
