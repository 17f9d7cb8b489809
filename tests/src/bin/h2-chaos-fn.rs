//! A hostile gRPC "function" for the relay's random instance sessions: it listens on
//! 127.0.0.1:$PORT and answers each unary request by echoing its message (a gRPC EchoRequest's
//! field 1 is EchoResponse's field 1 too), but a seeded random share of its answers are broken: a
//! byte changed, garbage frames, an answer on a stream never opened, or the connection closed. The seed
//! is CHAOS_SEED (default 1) and the connection's number, so a run replays.
#![forbid(unsafe_code)]

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
};

use fnmesh_tests::rng::Rng;

use fnmesh_codec::{
    hpack::encode_field,
    http2::{self, flag, kind, FrameHead, FRAME_HEAD_LEN},
};

fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8085);
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let listener = TcpListener::bind(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("h2-chaos-fn: cannot listen on 127.0.0.1:{port}: {e}"));
    for (n, conn) in listener.incoming().enumerate() {
        let Ok(conn) = conn else { continue };
        let rng = Rng((seed ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).max(1));
        std::thread::spawn(move || serve(conn, rng));
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    FrameHead {
        len: payload.len(),
        kind,
        flags,
        stream,
    }
    .write(out);
    out.extend_from_slice(payload);
}

/// One connection: SETTINGS, then an answer (whole or broken) to each request that ends.
fn serve(mut conn: TcpStream, mut rng: Rng) {
    let _ = conn.set_nodelay(true);
    let mut out = Vec::new();
    http2::write_settings(&mut out, &[], false);
    if conn.write_all(&out).is_err() {
        return;
    }
    let mut buf = Vec::new();
    let mut preface = false;
    let mut bodies: std::collections::HashMap<u32, Vec<u8>> = Default::default();
    let mut chunk = [0u8; 16 << 10];
    loop {
        let n = match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        if !preface {
            if buf.len() < fnmesh_codec::HTTP2_PREFACE.len() {
                continue;
            }
            buf.drain(..fnmesh_codec::HTTP2_PREFACE.len());
            preface = true;
        }
        let mut out = Vec::new();
        while let Some(head) = FrameHead::parse(&buf) {
            if buf.len() < FRAME_HEAD_LEN + head.len {
                break;
            }
            let payload: Vec<u8> = buf
                .drain(..FRAME_HEAD_LEN + head.len)
                .skip(FRAME_HEAD_LEN)
                .collect();
            match head.kind {
                kind::SETTINGS if !head.is(flag::ACK) => http2::write_settings(&mut out, &[], true),
                kind::PING if !head.is(flag::ACK) => {
                    frame(&mut out, kind::PING, flag::ACK, 0, &payload)
                }
                kind::DATA => {
                    bodies
                        .entry(head.stream)
                        .or_default()
                        .extend_from_slice(&payload);
                    if !payload.is_empty() {
                        // Credit what was read, so that the relay can go on sending.
                        http2::write_window_update(&mut out, 0, payload.len() as u32);
                    }
                    if head.is(flag::END_STREAM) {
                        let body = bodies.remove(&head.stream).unwrap_or_default();
                        if !answer(&mut out, &mut rng, head.stream, &body) {
                            let _ = conn.write_all(&out);
                            return; // the connection closed mid-answer
                        }
                    }
                }
                _ => {}
            }
        }
        if conn.write_all(&out).is_err() {
            return;
        }
    }
}

/// Writes the answer to `stream`; false to close the connection after what is written.
fn answer(out: &mut Vec<u8>, rng: &mut Rng, stream: u32, body: &[u8]) -> bool {
    let mut a = Vec::new();
    let mut head = Vec::new();
    encode_field(&mut head, b":status", b"200", false);
    encode_field(&mut head, b"content-type", b"application/grpc", false);
    let mut trailers = Vec::new();
    encode_field(&mut trailers, b"grpc-status", b"0", false);
    // Now and then on a stream the relay never opened (an answer on another open stream would be
    // the function answering the wrong call, which no proxy can see).
    let on = if rng.below(20) == 0 {
        stream + 20_000
    } else {
        stream
    };
    frame(&mut a, kind::HEADERS, flag::END_HEADERS, on, &head);
    frame(&mut a, kind::DATA, 0, on, body);
    frame(
        &mut a,
        kind::HEADERS,
        flag::END_HEADERS | flag::END_STREAM,
        on,
        &trailers,
    );
    match rng.below(10) {
        0 | 1 => {
            // A changed byte anywhere in the answer.
            let at = rng.below(a.len());
            a[at] ^= 1 + rng.below(255) as u8;
        }
        2 => {
            // Garbage after it.
            a.extend((0..1 + rng.below(64)).map(|_| rng.next_u64() as u8));
        }
        3 if rng.below(3) == 0 => {
            // The answer cut short, and the connection closed.
            a.truncate(rng.below(a.len()));
            out.extend_from_slice(&a);
            return false;
        }
        _ => {}
    }
    out.extend_from_slice(&a);
    true
}
