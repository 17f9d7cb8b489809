//! Decoding a TTHeader frame and rewriting its seqid allocate nothing. This file holds one test so
//! that no other test thread allocates while it counts.

use std::alloc::System;

use bytes::BytesMut;
use fnmesh_codec::{FrameDecoder, Limits};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const VOLO_TTHEADER: &[u8] = include_bytes!("fixtures/volo_ttheader_framed.bin");

#[test]
fn decoding_a_ttheader_frame_and_rewriting_its_seqid_allocates_nothing() {
    let frames = 8;
    let mut buf = BytesMut::with_capacity(VOLO_TTHEADER.len() * frames);
    for _ in 0..frames {
        buf.extend_from_slice(VOLO_TTHEADER);
    }
    let mut decoder = FrameDecoder::new(Limits::default());

    // The first split of a fresh buffer turns its Vec into shared storage: one allocation per
    // read buffer, not per frame.
    let region = Region::new(GLOBAL);
    let first = decoder.decode(&mut buf).unwrap().unwrap();
    assert!(region.change().allocations <= 1);
    drop(first);

    let region = Region::new(GLOBAL);
    for i in 1..frames {
        let mut frame = decoder.decode(&mut buf).unwrap().unwrap();
        let h = *frame.ttheader().unwrap();
        assert_eq!(frame.name(), "Echo");
        assert_eq!(h.rpc_timeout_ms(frame.head()), Some(500));
        assert_eq!(h.idl_service(frame.head()), Some(&b"EchoService"[..]));
        frame.set_seqid(1000 + i as i32).unwrap();
        assert_eq!(frame.seqid(), 1000 + i as i32);
        let (head, payload) = frame.into_parts();
        assert_eq!(head.len() + payload.len(), VOLO_TTHEADER.len());
    }
    let change = region.change();
    assert_eq!(
        (change.allocations, change.reallocations),
        (0, 0),
        "decode + seqid rewrite of {} frames",
        frames - 1
    );
    assert!(buf.is_empty());
}
