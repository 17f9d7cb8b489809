//! fnmesh's HTTP/2 framing and HPACK against real volo-grpc 0.12 peers (h2 inside): a client's
//! request header blocks, Huffman-coded and using its dynamic table, decode to what it sent, and
//! it reads the answers fnmesh's encoder writes; a server answers requests fnmesh's encoder writes
//! and its header blocks and trailers decode to what it sent.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fnmesh_codec::{
    hpack::{encode_field, Decoder, DEFAULT_TABLE_SIZE},
    http2::{
        flag, header_block, kind, ping, settings, unpad, write_ping, write_settings, FrameHead,
        DEFAULT_MAX_FRAME, FRAME_HEAD_LEN,
    },
    HTTP2_PREFACE,
};
use fnmesh_tests::{
    bench::start_function,
    proto::proto_gen::echo::{EchoClientBuilder, EchoRequest},
    sidecar::grpc_echo_fn,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// One side of an HTTP/2 connection, driven by hand with fnmesh's codec.
struct Peer {
    sock: TcpStream,
    buf: BytesMut,
    decoder: Decoder,
    /// A header block being put together from HEADERS and CONTINUATION frames.
    block: Vec<u8>,
}

/// What arrived for one stream.
#[derive(Default, Debug)]
struct Stream {
    headers: Vec<HashMap<String, String>>,
    data: Vec<u8>,
    ended: bool,
}

impl Peer {
    fn new(sock: TcpStream) -> Peer {
        Peer {
            sock,
            buf: BytesMut::new(),
            decoder: Decoder::new(DEFAULT_TABLE_SIZE, 1 << 16),
            block: Vec::new(),
        }
    }

    async fn fill(&mut self, n: usize) {
        while self.buf.len() < n {
            let read = self.sock.read_buf(&mut self.buf).await.expect("read");
            assert!(read > 0, "peer closed the connection");
        }
    }

    async fn frame(&mut self) -> (FrameHead, Bytes) {
        self.fill(FRAME_HEAD_LEN).await;
        let head = FrameHead::parse(&self.buf).expect("head");
        head.check(DEFAULT_MAX_FRAME).expect("frame size");
        self.fill(FRAME_HEAD_LEN + head.len).await;
        self.buf.advance(FRAME_HEAD_LEN);
        (head, self.buf.split_to(head.len).freeze())
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).await.expect("write");
    }

    /// Reads frames, answering SETTINGS and PING, until a stream ends; gives its number and what
    /// arrived on it.
    async fn until_stream_ends(&mut self, streams: &mut HashMap<u32, Stream>) -> u32 {
        loop {
            let (head, payload) = self.frame().await;
            let mut reply = Vec::new();
            match head.kind {
                kind::SETTINGS if !head.is(flag::ACK) => {
                    settings(&head, &payload, |_, _| ()).expect("settings");
                    write_settings(&mut reply, &[], true);
                }
                kind::PING if !head.is(flag::ACK) => {
                    write_ping(&mut reply, ping(&head, &payload).expect("ping"), true);
                }
                kind::HEADERS | kind::CONTINUATION => {
                    let fragment = if head.kind == kind::HEADERS {
                        header_block(&head, &payload).expect("headers")
                    } else {
                        &payload[..]
                    };
                    self.block.extend_from_slice(fragment);
                    let s = streams.entry(head.stream).or_default();
                    if head.kind == kind::HEADERS && head.is(flag::END_STREAM) {
                        s.ended = true;
                    }
                    if head.is(flag::END_HEADERS) {
                        let mut fields = HashMap::new();
                        let block = std::mem::take(&mut self.block);
                        self.decoder
                            .decode(&block, |f| {
                                fields.insert(
                                    String::from_utf8(f.name.to_vec()).unwrap(),
                                    String::from_utf8(f.value.to_vec()).unwrap(),
                                );
                            })
                            .expect("header block decodes");
                        s.headers.push(fields);
                        if s.ended {
                            return head.stream;
                        }
                    }
                }
                kind::DATA => {
                    let s = streams.entry(head.stream).or_default();
                    s.data
                        .extend_from_slice(unpad(&head, &payload).expect("data"));
                    if head.is(flag::END_STREAM) {
                        s.ended = true;
                        return head.stream;
                    }
                }
                _ => {}
            }
            if !reply.is_empty() {
                self.send(&reply).await;
            }
        }
    }
}

/// A gRPC message (uncompressed) holding a protobuf message whose field 1 is `text`.
fn grpc_message(text: &str) -> Vec<u8> {
    let mut proto = vec![0x0a, text.len() as u8];
    proto.extend_from_slice(text.as_bytes());
    let mut m = vec![0];
    m.put_u32(proto.len() as u32);
    m.extend_from_slice(&proto);
    m
}

/// Field 1 of the protobuf message inside one gRPC message.
fn field_one(grpc: &[u8]) -> String {
    assert_eq!(grpc[0], 0, "uncompressed");
    let proto = &grpc[5..];
    assert_eq!(proto[0], 0x0a);
    String::from_utf8(proto[2..2 + usize::from(proto[1])].to_vec()).unwrap()
}

/// A HEADERS frame on `stream` carrying `fields`, written with fnmesh's encoder.
fn headers_frame(stream: u32, fields: &[(&str, &str)], end_stream: bool) -> Vec<u8> {
    let mut block = Vec::new();
    for (n, v) in fields {
        encode_field(&mut block, n.as_bytes(), v.as_bytes(), false);
    }
    let mut f = Vec::new();
    FrameHead {
        len: block.len(),
        kind: kind::HEADERS,
        flags: flag::END_HEADERS | if end_stream { flag::END_STREAM } else { 0 },
        stream,
    }
    .write(&mut f);
    f.extend_from_slice(&block);
    f
}

fn data_frame(stream: u32, data: &[u8], end_stream: bool) -> Vec<u8> {
    let mut f = Vec::new();
    FrameHead {
        len: data.len(),
        kind: kind::DATA,
        flags: if end_stream { flag::END_STREAM } else { 0 },
        stream,
    }
    .write(&mut f);
    f.extend_from_slice(data);
    f
}

const CALLS: [&str; 3] = ["one", "two", "three"];

#[tokio::test]
async fn a_volo_grpc_client_is_understood_and_understands() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = tokio::spawn(async move {
        let client = EchoClientBuilder::new("echo").address(addr).build();
        let mut replies = Vec::new();
        for text in CALLS {
            let r = client
                .unary_echo(EchoRequest {
                    message: text.into(),
                    sleep_ms: 0,
                })
                .await
                .expect("call answered");
            replies.push(r.get_ref().message.to_string());
        }
        replies
    });
    let server = async {
        let (sock, _) = listener.accept().await.unwrap();
        let mut peer = Peer::new(sock);
        peer.fill(HTTP2_PREFACE.len()).await;
        assert_eq!(&peer.buf[..HTTP2_PREFACE.len()], HTTP2_PREFACE);
        peer.buf.advance(HTTP2_PREFACE.len());
        let mut hello = Vec::new();
        write_settings(&mut hello, &[], false);
        peer.send(&hello).await;
        let mut streams = HashMap::new();
        let mut requests = Vec::new();
        for _ in CALLS {
            let id = peer.until_stream_ends(&mut streams).await;
            let s = &streams[&id];
            let text = field_one(&s.data);
            let mut answer = headers_frame(
                id,
                &[(":status", "200"), ("content-type", "application/grpc")],
                false,
            );
            answer.extend(data_frame(id, &grpc_message(&format!("re: {text}")), false));
            answer.extend(headers_frame(
                id,
                &[("grpc-status", "0"), ("grpc-message", "")],
                true,
            ));
            peer.send(&answer).await;
            requests.push((s.headers[0].clone(), text));
        }
        (requests, peer.decoder.table_len())
    };
    let ((requests, table_len), replies) = tokio::time::timeout(Duration::from_secs(20), async {
        let server = server.await;
        (server, client.await.unwrap())
    })
    .await
    .expect("three calls within 20 s");
    assert_eq!(replies, ["re: one", "re: two", "re: three"]);
    for ((headers, text), sent) in requests.iter().zip(CALLS) {
        assert_eq!(text, sent);
        assert_eq!(headers[":method"], "POST");
        assert_eq!(headers[":scheme"], "http");
        assert_eq!(headers[":path"], "/echo.Echo/UnaryEcho");
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(headers["te"], "trailers");
    }
    // h2's encoder indexes fields: later requests referred to the dynamic table.
    assert!(table_len > 0, "the client never used the dynamic table");
}

#[tokio::test]
async fn a_volo_grpc_server_answers_and_is_understood() {
    let (_function, addr): (_, SocketAddr) = start_function(&grpc_echo_fn());
    let sock = TcpStream::connect(addr).await.unwrap();
    let mut peer = Peer::new(sock);
    let mut hello = HTTP2_PREFACE.to_vec();
    write_settings(&mut hello, &[], false);
    peer.send(&hello).await;
    let authority = addr.to_string();
    let mut streams = HashMap::new();
    let within = Duration::from_secs(20);
    for (i, text) in CALLS.iter().enumerate() {
        let id = 1 + 2 * i as u32;
        let mut call = headers_frame(
            id,
            &[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/echo.Echo/UnaryEcho"),
                (":authority", &authority),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
            false,
        );
        call.extend(data_frame(id, &grpc_message(text), true));
        peer.send(&call).await;
        let ended = tokio::time::timeout(within, peer.until_stream_ends(&mut streams))
            .await
            .expect("answered within 20 s");
        assert_eq!(ended, id);
        let s = &streams[&id];
        assert_eq!(s.headers.len(), 2, "response headers and trailers");
        assert_eq!(s.headers[0][":status"], "200");
        assert_eq!(s.headers[0]["content-type"], "application/grpc");
        assert_eq!(s.headers[1]["grpc-status"], "0");
        assert_eq!(field_one(&s.data), *text);
    }
    // h2's encoder indexes fields: the later answers referred to the dynamic table.
    assert!(
        peer.decoder.table_len() > 0,
        "the server never used the dynamic table"
    );
}
