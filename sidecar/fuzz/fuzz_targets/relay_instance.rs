#![no_main]
//! Arbitrary instance answers against scripted callers: one or two gRPC callers each send a
//! unary call through a whole sidecar to a scripted instance, which the input drives (HEADERS,
//! DATA, trailers, RST_STREAM, WINDOW_UPDATE, PING, GOAWAY, SETTINGS, header blocks and frames of
//! any type and content, on the calls' streams or any other, and cuts), after which the instance
//! closes its connections. Checked here: each caller receives as response body only bytes the
//! instance sent as DATA on that caller's own stream, in order; every caller's stream ends within
//! the call timeout; no panic on any thread; memory within libFuzzer's RSS limit.
use std::{
    io::{ErrorKind, Read, Write},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use fnmesh_codec::{
    hpack::encode_field,
    http2::{flag, kind, FrameHead, FRAME_HEAD_LEN},
};
use libfuzzer_sys::fuzz_target;

#[path = "sidecar.rs"]
#[allow(dead_code)]
mod sidecar;
use sidecar::Input;

fuzz_target!(init: sidecar::watchdog_or_nothing(), |data: &[u8]| {
    exchange(&mut Input(data));
});

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(ty);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Frames from the front of `buf` (after `skip` bytes of preface), whole ones only.
fn frames(buf: &mut Vec<u8>) -> Vec<(FrameHead, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(head) = FrameHead::parse(&buf[at..]) {
        let end = at + FRAME_HEAD_LEN + head.len;
        if buf.len() < end {
            break;
        }
        out.push((head, buf[at + FRAME_HEAD_LEN..end].to_vec()));
        at = end;
    }
    buf.drain(..at);
    out
}

/// A caller: its connection, what it has read, and what its stream 1 got.
struct Caller {
    s: TcpStream,
    buf: Vec<u8>,
    body: Vec<u8>,
    ended: bool,
}

fn call(c: usize) -> Option<Caller> {
    let (addr, _) = sidecar::scripted();
    let mut s = TcpStream::connect(addr).ok()?;
    let _ = s.set_nodelay(true);
    let mut out = PREFACE.to_vec();
    frame(&mut out, kind::SETTINGS, 0, 0, &[]);
    let mut block = Vec::new();
    for (n, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/echo.Echo/UnaryEcho"),
        (":authority", "fuzz"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        encode_field(&mut block, n.as_bytes(), v.as_bytes(), false);
    }
    frame(&mut out, kind::HEADERS, flag::END_HEADERS, 1, &block);
    let text = format!("caller{c}");
    let mut msg = vec![0, 0, 0, 0, 2 + text.len() as u8, 0x0a, text.len() as u8];
    msg.extend_from_slice(text.as_bytes());
    frame(&mut out, kind::DATA, flag::END_STREAM, 1, &msg);
    s.write_all(&out).ok()?;
    s.set_nonblocking(true).ok()?;
    Some(Caller {
        s,
        buf: Vec::new(),
        body: Vec::new(),
        ended: false,
    })
}

/// A connection from the sidecar to the instance, and the calls it carried: (stream, caller).
struct Up {
    s: TcpStream,
    buf: Vec<u8>,
    preface: bool,
    streams: Vec<(u32, Vec<u8>, bool)>,
}

impl Up {
    /// Reads what the sidecar sent; acknowledges its SETTINGS. False once the connection is gone.
    fn read(&mut self) -> bool {
        let mut chunk = [0u8; 16 << 10];
        let alive = loop {
            match self.s.read(&mut chunk) {
                Ok(0) => break false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
        if !self.preface && self.buf.len() >= PREFACE.len() {
            self.buf.drain(..PREFACE.len());
            self.preface = true;
        }
        if !self.preface {
            return alive;
        }
        for (head, payload) in frames(&mut self.buf) {
            match head.kind {
                kind::SETTINGS if head.flags & flag::ACK == 0 => {
                    let mut out = Vec::new();
                    frame(&mut out, kind::SETTINGS, flag::ACK, 0, &[]);
                    let _ = self.s.write_all(&out);
                }
                kind::HEADERS => self.streams.push((head.stream, Vec::new(), false)),
                kind::DATA => {
                    if let Some(st) = self.streams.iter_mut().find(|x| x.0 == head.stream) {
                        st.1.extend_from_slice(&payload);
                        st.2 |= head.flags & flag::END_STREAM != 0;
                    }
                }
                _ => {}
            }
        }
        alive
    }
}

fn accept(l: &TcpListener, ups: &mut Vec<Up>) {
    let _ = l.set_nonblocking(true);
    while let Ok((s, _)) = l.accept() {
        let _ = s.set_nodelay(true);
        let _ = s.set_nonblocking(true);
        let mut out = Vec::new();
        frame(&mut out, kind::SETTINGS, 0, 0, &[]);
        let mut s = s;
        let _ = s.write_all(&out);
        ups.push(Up {
            s,
            buf: Vec::new(),
            preface: false,
            streams: Vec::new(),
        });
    }
}

/// The calls that reached the instance whole: (up connection, stream, caller).
fn requests(ups: &[Up], callers: usize) -> Vec<(usize, u32, usize)> {
    let mut out = Vec::new();
    for (i, up) in ups.iter().enumerate() {
        for (id, data, ended) in &up.streams {
            let who = (0..callers).find(|c| {
                let text = format!("caller{c}");
                data.windows(text.len()).any(|w| w == text.as_bytes())
            });
            if let (Some(c), true) = (who, ended) {
                out.push((i, *id, c));
            }
        }
    }
    out
}

fn exchange(input: &mut Input) {
    let (_, listener) = sidecar::scripted();
    let callers = 1 + input.byte() as usize % 2;
    let mut cs: Vec<Caller> = (0..callers).filter_map(call).collect();
    if cs.len() < callers {
        return;
    }
    let mut ups = Vec::new();
    // Until every call reached the instance (or 200 ms: a call may also be refused earlier).
    let until = Instant::now() + Duration::from_millis(200);
    let mut reqs = Vec::new();
    while Instant::now() < until {
        accept(listener, &mut ups);
        ups.retain_mut(|u| u.read());
        reqs = requests(&ups, callers);
        if reqs.len() >= callers {
            break;
        }
        std::thread::sleep(Duration::from_micros(20));
    }
    let sent = answer(input, &mut ups, &reqs, callers);
    drop(ups);
    finish(listener, &mut cs, &sent);
}

/// Plays the input's answer; what each caller's stream was sent as DATA.
fn answer(
    input: &mut Input,
    ups: &mut [Up],
    reqs: &[(usize, u32, usize)],
    callers: usize,
) -> Vec<Vec<u8>> {
    let mut sent = vec![Vec::new(); callers];
    let mut pauses = 0;
    for _ in 0..32 {
        if input.is_empty() || reqs.is_empty() {
            break;
        }
        let op = input.byte();
        let &(up, id, who) = &reqs[input.byte() as usize % reqs.len()];
        let mut out = Vec::new();
        match op % 12 {
            0 | 1 => {
                let mut block = Vec::new();
                encode_field(&mut block, b":status", b"200", false);
                encode_field(&mut block, b"content-type", b"application/grpc", false);
                let end = if op & 0x80 != 0 { flag::END_STREAM } else { 0 };
                frame(&mut out, kind::HEADERS, flag::END_HEADERS | end, id, &block);
            }
            2 | 3 => {
                let n = input.byte() as usize;
                let data = input.take(n);
                let end = if op & 0x80 != 0 { flag::END_STREAM } else { 0 };
                if op & 0x40 != 0 {
                    // Valid padding: a pad length past the frame is a protocol error, which
                    // frames of any type (below) try.
                    let pad = input.byte() % 64;
                    let mut p = vec![pad];
                    p.extend_from_slice(&data);
                    p.resize(p.len() + pad as usize, 0);
                    frame(&mut out, kind::DATA, flag::PADDED | end, id, &p);
                } else {
                    frame(&mut out, kind::DATA, end, id, &data);
                }
                sent[who].extend_from_slice(&data);
            }
            4 => {
                let mut block = Vec::new();
                let status = (input.byte() % 17).to_string();
                encode_field(&mut block, b"grpc-status", status.as_bytes(), false);
                frame(
                    &mut out,
                    kind::HEADERS,
                    flag::END_HEADERS | flag::END_STREAM,
                    id,
                    &block,
                );
            }
            5 => frame(
                &mut out,
                kind::RST_STREAM,
                0,
                id,
                &input.u32().to_be_bytes(),
            ),
            6 => {
                let on = if op & 0x80 != 0 { 0 } else { id };
                frame(
                    &mut out,
                    kind::WINDOW_UPDATE,
                    0,
                    on,
                    &input.u32().to_be_bytes(),
                );
            }
            7 => {
                let mut p = input.u32().to_be_bytes().to_vec();
                p.extend_from_slice(&input.u32().to_be_bytes());
                let flags = input.byte();
                frame(&mut out, kind::PING, flags, 0, &p);
            }
            8 => {
                let mut p = input.u32().to_be_bytes().to_vec();
                p.extend_from_slice(&input.u32().to_be_bytes());
                frame(&mut out, kind::GOAWAY, 0, 0, &p);
            }
            9 => {
                // A header block or SETTINGS of the input's bytes.
                let n = input.byte() as usize;
                let bytes = input.take(n);
                let (ty, on) = if op & 0x80 != 0 {
                    (kind::SETTINGS, 0)
                } else {
                    (kind::HEADERS, id)
                };
                let flags = input.byte();
                frame(&mut out, ty, flags, on, &bytes);
            }
            10 => {
                // Any frame but DATA (whose bytes would be a body): any type, flags, stream.
                let ty = match input.byte() {
                    kind::DATA => 0xa,
                    k => k,
                };
                let flags = input.byte();
                let on = if op & 0x80 != 0 { input.u32() } else { id };
                let n = input.byte() as usize;
                let bytes = input.take(n);
                frame(&mut out, ty, flags, on, &bytes);
            }
            _ => {
                if op & 0x80 != 0 {
                    let _ = ups[up].s.shutdown(std::net::Shutdown::Both);
                } else if pauses < 4 {
                    pauses += 1;
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }
        let _ = ups[up].s.write_all(&out);
    }
    sent
}

/// Reads every caller's answer until its stream ends, while any call that reaches the instance
/// now (a retry, or one that came late) finds its connection closed at once.
fn finish(listener: &TcpListener, cs: &mut [Caller], sent: &[Vec<u8>]) {
    let until = Instant::now() + Duration::from_millis(1500);
    let mut chunk = [0u8; 16 << 10];
    while cs.iter().any(|c| !c.ended) {
        assert!(
            Instant::now() < until,
            "a caller's stream did not end within 1.5 s of the instance closing (call timeout 1 s)"
        );
        while let Ok((s, _)) = listener.accept() {
            drop(s);
        }
        for (who, c) in cs.iter_mut().enumerate() {
            if c.ended {
                continue;
            }
            match c.s.read(&mut chunk) {
                Ok(0) => c.ended = true,
                Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(_) => c.ended = true,
            }
            for (head, payload) in frames(&mut c.buf) {
                match (head.kind, head.stream) {
                    (kind::DATA, 1) => {
                        let body = if head.flags & flag::PADDED != 0 {
                            let pad = payload.first().copied().unwrap_or(0) as usize;
                            payload
                                .get(1..payload.len().saturating_sub(pad))
                                .unwrap_or(&[])
                                .to_vec()
                        } else {
                            payload
                        };
                        c.body.extend_from_slice(&body);
                        c.ended |= head.flags & flag::END_STREAM != 0;
                    }
                    (kind::HEADERS, 1) => c.ended |= head.flags & flag::END_STREAM != 0,
                    (kind::RST_STREAM, 1) => c.ended = true,
                    (kind::GOAWAY, _) => c.ended |= payload.get(..4) == Some(&[0, 0, 0, 0]),
                    _ => {}
                }
            }
            assert!(
                sent[who].starts_with(&c.body),
                "caller {who} got {:?}; the instance sent it {:?}",
                c.body,
                sent[who]
            );
        }
        std::thread::sleep(Duration::from_micros(20));
    }
}
