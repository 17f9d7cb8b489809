#![no_main]
//! Pipelined echo calls on one connection in one transport (TTHeader, Framed or unframed
//! Binary), written in pieces the input chooses, now and then with a byte changed outside the
//! calls' texts, against a whole sidecar. Checked here: every reply goes to the call that asked
//! (its seqid and its own text), in order; a connection left whole gets every reply; no panic on
//! any thread; memory within libFuzzer's RSS limit.
use std::{
    io::{Read, Write},
    net::TcpStream,
    ops::Range,
    time::{Duration, Instant},
};

use bytes::{BufMut, BytesMut};
use fnmesh_codec::{FrameDecoder, Limits, MessageHeader, MessageType, Protocol, TTHeaderBuilder};
use libfuzzer_sys::fuzz_target;

#[path = "sidecar.rs"]
#[allow(dead_code)]
mod sidecar;
use sidecar::Input;

fuzz_target!(init: sidecar::watchdog_or_nothing(), |data: &[u8]| {
    session(&mut Input(data));
});

/// A Binary `Echo` call message with `EchoRequest { message }`.
fn message(seqid: i32, text: &str) -> BytesMut {
    let mut m = BytesMut::new();
    MessageHeader::encode(
        &mut m,
        Protocol::Binary,
        true,
        MessageType::Call,
        "Echo",
        seqid,
    );
    m.put_slice(&[0x0c, 0, 1, 0x0b, 0, 1]);
    m.put_u32(text.len() as u32);
    m.put_slice(text.as_bytes());
    m.put_slice(&[0, 0]);
    m
}

fn call(transport: u8, seqid: i32, text: &str) -> Vec<u8> {
    let m = message(seqid, text);
    let mut out = BytesMut::new();
    match transport {
        0 => {
            let header = TTHeaderBuilder {
                seqid: seqid as u32,
                inner_framed: true,
                ..Default::default()
            };
            header.encode(&mut out, m.len()).unwrap();
        }
        1 => out.put_u32(m.len() as u32),
        _ => {}
    }
    out.put_slice(&m);
    out.to_vec()
}

fn session(input: &mut Input) {
    let transport = input.byte() % 3;
    let calls = 1 + input.byte() as usize % 12;
    let mut bytes = Vec::new();
    let mut asked = Vec::new();
    let mut texts: Vec<Range<usize>> = Vec::new();
    for k in 0..calls {
        let seqid = (input.u32() as i32 & 0x7fff_0000) | k as i32;
        let text = format!("q{seqid}-{}", "x".repeat(input.byte() as usize % 64));
        let c = call(transport, seqid, &text);
        let at = c
            .windows(text.len())
            .position(|w| w == text.as_bytes())
            .unwrap();
        texts.push(bytes.len() + at..bytes.len() + at + text.len());
        bytes.extend(c);
        asked.push((seqid, text));
    }
    // One connection in five gets a byte changed anywhere but in a text (framing, headers,
    // field headers, lengths), so that every reply still says whose call it was.
    let corrupt = input.byte() % 5 == 0;
    if corrupt {
        let at = (input.u32() as usize) % bytes.len();
        if !texts.iter().any(|t| t.contains(&at)) {
            bytes[at] ^= input.byte() | 1;
        }
    }
    let Ok(mut s) = TcpStream::connect(sidecar::addr()) else {
        return;
    };
    let _ = s.set_nodelay(true);
    // In pieces of 1-256 bytes; a piece whose size byte has its top bit set is followed by a
    // pause, at most four per connection.
    let (mut rest, mut pauses) = (&bytes[..], 0);
    while !rest.is_empty() {
        let b = input.byte();
        let n = if input.is_empty() {
            rest.len()
        } else {
            (1 + (b & 0x7f) as usize * 2).min(rest.len())
        };
        if s.write_all(&rest[..n]).is_err() {
            break;
        }
        rest = &rest[n..];
        if b & 0x80 != 0 && pauses < 4 {
            pauses += 1;
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    check(&mut s, &asked, corrupt);
}

/// Reads the replies until every call is answered or the sidecar closes. A connection left whole
/// gets every reply, in order, each with its call's seqid and text; a connection with a changed
/// byte gets only its own calls' texts back, and is read for 5 ms at most (a call the change made
/// unreadable to the function waits for its timeout).
fn check(s: &mut TcpStream, asked: &[(i32, String)], corrupt: bool) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(if corrupt { 5 } else { 3000 })));
    let mut buf = BytesMut::new();
    let mut all = Vec::new();
    let mut ending = String::from("closed");
    let mut d = FrameDecoder::new(Limits::default());
    let (mut next, mut chunk) = (0, [0u8; 16 << 10]);
    let started = Instant::now();
    loop {
        while let Ok(Some(f)) = d.decode(&mut buf) {
            let payload = String::from_utf8_lossy(f.payload());
            if corrupt {
                // The changed byte may be a seqid, a length or a message type: whatever comes
                // back is still only ever this connection's.
                assert!(
                    f.kind() == MessageType::Exception
                        || asked.iter().any(|(_, m)| payload.contains(m.as_str())),
                    "seqid {} got {payload:?}, which no call on this connection sent",
                    f.seqid()
                );
                continue;
            }
            let Some((seqid, m)) = asked.get(next) else {
                panic!(
                    "a reply with seqid {} after every call was answered",
                    f.seqid()
                );
            };
            assert!(
                f.kind() == MessageType::Reply
                    && f.seqid() == *seqid
                    && payload.contains(m.as_str()),
                "call {next} (seqid {seqid}, {m:?}) got a {:?} with seqid {}: {payload:?}",
                f.kind(),
                f.seqid()
            );
            next += 1;
        }
        if next == asked.len() {
            return;
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            // A signal (the sidecar's children exiting) interrupted the wait: not an ending.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                ending = e.to_string();
                break;
            }
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                all.extend_from_slice(&chunk[..n]);
            }
        }
    }
    assert!(
        corrupt || next == asked.len(),
        "{} of {} calls answered on a connection left whole ({ending} after {:?}); it got {:02x?}, which decodes as {:?}",
        next,
        asked.len(),
        started.elapsed(),
        all,
        FrameDecoder::new(Limits::default()).decode(&mut BytesMut::from(&all[..])),
    );
}
