//! Header decode of a request captured from a real Volo 0.12 client (TTHeader + Framed + Binary,
//! with caller, timeout and metainfo keys), and of Framed and buffered requests; plus decode with a
//! seqid rewrite, the proxy's per-request work. Run: `cargo bench -p fnmesh-codec`.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use fnmesh_codec::{FrameDecoder, Limits};

const VOLO_TTHEADER: &[u8] = include_bytes!("../tests/fixtures/volo_ttheader_framed.bin");
const VOLO_FRAMED: &[u8] = include_bytes!("../tests/fixtures/volo_framed.bin");
const VOLO_BUFFERED: &[u8] = include_bytes!("../tests/fixtures/volo_buffered.bin");

/// Frames per refill of the read buffer: like a connection's buffer, it is reused (and so stays
/// in cache) instead of growing with the iteration count.
const BATCH: u64 = 64;

/// Times decoding `iters` copies of `frame` from one reused read buffer, as a connection task
/// would; refilling the buffer is not timed.
#[derive(Clone, Copy, PartialEq)]
enum Work {
    /// Decode only: the frame and its parsed view.
    Decode,
    /// Decode, then read what routing reads: the name, `isn` and the RPC timeout.
    RouteFields,
    /// Decode, read the routing fields, rewrite the seqid: a proxy's whole per-request header work.
    Rewrite,
}

fn decode_stream(frame: &[u8], iters: u64, work: Work) -> Duration {
    let mut buf = BytesMut::with_capacity(frame.len() * BATCH as usize);
    let mut decoder = FrameDecoder::new(Limits::default());
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let n = BATCH.min(iters - done);
        // Every frame of the last batch has been dropped, so this reclaims the same memory.
        buf.reserve(frame.len() * n as usize);
        for _ in 0..n {
            buf.extend_from_slice(frame);
        }
        let start = Instant::now();
        for i in 0..n {
            let mut f = decoder.decode(&mut buf).unwrap().unwrap();
            if work != Work::Decode {
                black_box(f.name().len());
                black_box(f.ttheader().map(|h| {
                    (
                        h.rpc_timeout_ms(f.head()),
                        h.idl_service(f.head()).map(<[u8]>::len),
                    )
                }));
            }
            if work == Work::Rewrite {
                f.set_seqid(i as i32).unwrap();
            }
            black_box(&f);
        }
        total += start.elapsed();
        done += n;
    }
    total
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("header_decode");
    g.throughput(Throughput::Elements(1));
    for (name, frame) in [
        ("volo_ttheader_framed", VOLO_TTHEADER),
        ("volo_framed", VOLO_FRAMED),
        ("volo_buffered", VOLO_BUFFERED),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|n| decode_stream(frame, n, Work::Decode))
        });
    }
    g.bench_function("volo_ttheader_framed+route_fields", |b| {
        b.iter_custom(|n| decode_stream(VOLO_TTHEADER, n, Work::RouteFields))
    });
    g.bench_function("volo_ttheader_framed+route_fields+set_seqid", |b| {
        b.iter_custom(|n| decode_stream(VOLO_TTHEADER, n, Work::Rewrite))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
