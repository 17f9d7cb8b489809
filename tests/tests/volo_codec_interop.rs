//! fnmesh's codec against real Volo 0.12 peers: what a Volo client sends decodes to exactly what it
//! set; replies fnmesh encodes reach a Volo client as the ApplicationException fnmesh meant; frames
//! fnmesh rewrites are answered correctly by a real Volo server.

use std::{cell::RefCell, time::Duration};

use bytes::BytesMut;
use fnmesh_codec::{
    int_key, ExceptionType, FrameDecoder, Limits, MessageType, Protocol, Transport,
};
use fnmesh_tests::{
    capture::{CannedReply, Capture},
    echo::EchoHandler,
    gen::volo_gen::echo::{EchoRequest, EchoServiceClientBuilder, EchoServiceServer},
};
use metainfo::{Forward, MetaInfo, METAINFO};
use pilota::thrift::ApplicationExceptionKind;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use volo_thrift::{codec::default::DefaultMakeCodec, ClientError};

const CALLER: &str = "caller-svc";
const CALLEE: &str = "echo-svc";

fn request(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_owned().into(),
        sleep_ms: None,
        meta: None,
    }
}

/// Calls `Echo` through a Volo client built with `$codec`, caller name, 500 ms RPC timeout and
/// metainfo (one persistent, one transient key) set; evaluates to the client's result.
macro_rules! volo_call {
    ($addr:expr, $codec:expr, $message:expr) => {{
        let client = EchoServiceClientBuilder::new(CALLEE)
            .address($addr)
            .caller_name(CALLER)
            .rpc_timeout(Some(Duration::from_millis(500)))
            .make_codec($codec)
            .build();
        METAINFO
            .scope(RefCell::new(MetaInfo::default()), async {
                METAINFO.with(|m| {
                    let mut m = m.borrow_mut();
                    m.set_persistent("trace-id", "t-42");
                    m.set_transient("tenant", "acme");
                });
                client.echo(request($message)).await
            })
            .await
    }};
}

fn expect_app_exception<T>(
    result: Result<T, ClientError>,
    kind: ApplicationExceptionKind,
    message: &str,
) {
    match result {
        Err(ClientError::Application(e)) => {
            assert_eq!(e.kind(), kind, "exception type");
            assert!(
                e.message().contains(message),
                "exception message {:?} should carry {message:?}",
                e.message()
            );
        }
        Err(other) => panic!("expected an ApplicationException, got {other:?}"),
        Ok(_) => panic!("expected an ApplicationException, got a reply"),
    }
}

/// With `FNMESH_WRITE_FIXTURES=1`, saves a captured request as a fixture for the codec's own
/// tests (`codec/tests/fixtures/`), which must not depend on Volo.
fn write_fixture(name: &str, bytes: &[u8]) {
    if std::env::var_os("FNMESH_WRITE_FIXTURES").is_some() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../codec/tests/fixtures");
        std::fs::create_dir_all(path).unwrap();
        std::fs::write(format!("{path}/{name}"), bytes).unwrap();
    }
}

fn canned(ty: ExceptionType, message: &str, kind: &str) -> CannedReply {
    CannedReply {
        ty,
        message: message.into(),
        kind: kind.into(),
    }
}

#[tokio::test]
async fn ttheader_framed_request_decodes_to_what_the_volo_client_set() {
    let msg = "fnmesh: no function for service EchoService";
    let mut cap = Capture::start(canned(ExceptionType::UnknownMethod, msg, "no-route"))
        .await
        .unwrap();
    let result = volo_call!(cap.addr, DefaultMakeCodec::ttheader_framed(), "hi");
    expect_app_exception(result, ApplicationExceptionKind::UNKNOWN_METHOD, msg);

    let f = cap.next().await.expect("one request captured");
    write_fixture("volo_ttheader_framed.bin", &f.to_vec());
    assert_eq!(f.transport(), Transport::TTHeader);
    assert_eq!(f.protocol(), Protocol::Binary);
    assert_eq!(f.name(), "Echo");
    assert_eq!(f.kind(), MessageType::Call);
    let h = f.ttheader().expect("a TTHeader");
    let head = f.head();
    assert!(
        h.inner_framed,
        "Volo frames the payload inside the TTHeader"
    );
    assert_eq!(
        h.seqid as i32,
        f.seqid(),
        "TTHeader and message carry one seqid"
    );
    assert_eq!(h.idl_service(head), Some(&b"EchoService"[..]));
    assert_eq!(h.to_service(head), Some(CALLEE.as_bytes()));
    assert_eq!(h.to_method(head), Some(&b"Echo"[..]));
    assert_eq!(h.from_service(head), Some(CALLER.as_bytes()));
    assert_eq!(h.rpc_timeout_ms(head), Some(500));
    assert_eq!(h.int_value(head, int_key::RPC_TIMEOUT), Some(&b"500"[..]));
    assert_eq!(
        h.str_value(head, b"RPC_PERSIST_trace-id"),
        Some(&b"t-42"[..]),
        "persistent metainfo"
    );
    assert_eq!(
        h.str_value(head, b"RPC_TRANSIT_tenant"),
        Some(&b"acme"[..]),
        "transient metainfo"
    );
    assert!(
        f.payload().windows(2).any(|w| w == b"hi"),
        "the argument struct is the payload"
    );
}

#[tokio::test]
async fn framed_and_buffered_requests_decode_and_take_codec_replies() {
    for (label, ty, kind) in [
        (
            "framed",
            ExceptionType::InternalError,
            ApplicationExceptionKind::INTERNAL_ERROR,
        ),
        (
            "buffered",
            ExceptionType::ProtocolError,
            ApplicationExceptionKind::PROTOCOL_ERROR,
        ),
    ] {
        let msg = format!("fnmesh: echo-svc {label} test reply");
        let mut cap = Capture::start(canned(ty, &msg, "unavailable"))
            .await
            .unwrap();
        let result = if label == "framed" {
            volo_call!(cap.addr, DefaultMakeCodec::framed(), "hello")
        } else {
            volo_call!(cap.addr, DefaultMakeCodec::buffered(), "hello")
        };
        expect_app_exception(result, kind, &msg);
        let f = cap.next().await.expect("one request captured");
        let expected = if label == "framed" {
            Transport::Framed
        } else {
            Transport::Unframed
        };
        write_fixture(&format!("volo_{label}.bin"), &f.to_vec());
        assert_eq!(f.transport(), expected, "{label}");
        assert!(f.ttheader().is_none(), "{label}");
        assert_eq!((f.name(), f.kind()), ("Echo", MessageType::Call), "{label}");
        assert!(f.payload().windows(5).any(|w| w == b"hello"), "{label}");
    }
}

#[tokio::test]
async fn every_exception_type_reaches_a_ttheader_volo_client() {
    for (ty, kind) in [
        (ExceptionType::Unknown, ApplicationExceptionKind::UNKNOWN),
        (
            ExceptionType::UnknownMethod,
            ApplicationExceptionKind::UNKNOWN_METHOD,
        ),
        (
            ExceptionType::InternalError,
            ApplicationExceptionKind::INTERNAL_ERROR,
        ),
        (
            ExceptionType::ProtocolError,
            ApplicationExceptionKind::PROTOCOL_ERROR,
        ),
    ] {
        let msg = format!("fnmesh says {ty:?}");
        let mut cap = Capture::start(canned(ty, &msg, "timeout")).await.unwrap();
        let result = volo_call!(cap.addr, DefaultMakeCodec::ttheader_framed(), "x");
        expect_app_exception(result, kind, &msg);
        assert!(cap.next().await.is_some());
    }
}

/// Starts a real Volo echo server (default codec: TTHeader + Framed, which also reads Framed and
/// buffered requests) on a free port.
async fn start_volo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        EchoServiceServer::new(EchoHandler::default())
            .run(volo::net::incoming::DefaultIncoming::from(listener))
            .await
    });
    addr
}

async fn roundtrip(addr: std::net::SocketAddr, bytes: &[u8]) -> fnmesh_codec::Frame {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(bytes).await.unwrap();
    let mut decoder = FrameDecoder::new(Limits::default());
    let mut buf = BytesMut::new();
    loop {
        if let Some(f) = decoder
            .decode(&mut buf)
            .expect("the server's reply decodes")
        {
            return f;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read_buf(&mut buf))
            .await
            .expect("reply within 5 s")
            .unwrap();
        assert!(n > 0, "server closed the connection without a reply");
    }
}

#[tokio::test]
async fn a_real_volo_server_answers_frames_the_codec_rewrote() {
    // Capture what a real Volo client sends, then replay it to a real Volo server after rewriting
    // the seqid (TTHeader and message) and the RPC timeout (to a longer value, so the header grows).
    let mut cap = Capture::start(canned(ExceptionType::Unknown, "captured", "test"))
        .await
        .unwrap();
    let _ = volo_call!(cap.addr, DefaultMakeCodec::ttheader_framed(), "rewritten");
    let mut f = cap.next().await.unwrap();
    f.set_seqid(0x0102_0304).unwrap();
    f.set_int_key(int_key::RPC_TIMEOUT, b"123456").unwrap();
    f.set_int_key(int_key::TO_SERVICE, b"fnmesh-echo").unwrap();
    let server = start_volo_server().await;
    let reply = roundtrip(server, &f.to_vec()).await;
    assert_eq!(reply.kind(), MessageType::Reply);
    assert_eq!(reply.name(), "Echo");
    assert_eq!(reply.seqid(), 0x0102_0304);
    assert_eq!(reply.ttheader().unwrap().seqid, 0x0102_0304);
    assert!(reply.payload().windows(9).any(|w| w == b"rewritten"));

    // A TMultiplexedProtocol name, framed and buffered: the codec strips `EchoService:` and the
    // server answers the bare method.
    for transport in [Transport::Framed, Transport::Unframed] {
        let bytes = multiplexed_echo(transport, b"multiplexed");
        let mut buf = BytesMut::from(&bytes[..]);
        let mut f = FrameDecoder::new(Limits::default())
            .decode(&mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(f.name(), "EchoService:Echo");
        assert_eq!(
            f.strip_service_prefix().unwrap().as_deref(),
            Some("EchoService")
        );
        assert_eq!(f.name(), "Echo");
        f.set_seqid(77).unwrap();
        let reply = roundtrip(server, &f.to_vec()).await;
        assert_eq!(
            (reply.kind(), reply.seqid()),
            (MessageType::Reply, 77),
            "{transport:?}"
        );
        assert!(reply.payload().windows(11).any(|w| w == b"multiplexed"));
    }
}

fn multiplexed_echo(transport: Transport, message: &[u8]) -> Vec<u8> {
    use bytes::BufMut;
    let name = b"EchoService:Echo";
    let mut m = BytesMut::new();
    m.put_u32(0x8001_0001);
    m.put_u32(name.len() as u32);
    m.put_slice(name);
    m.put_i32(5);
    m.put_slice(&[0x0c, 0, 1, 0x0b, 0, 1]);
    m.put_u32(message.len() as u32);
    m.put_slice(message);
    m.put_slice(&[0, 0]);
    let mut out = BytesMut::new();
    if transport == Transport::Framed {
        out.put_u32(m.len() as u32);
    }
    out.put_slice(&m);
    out.to_vec()
}
