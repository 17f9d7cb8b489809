//! The IDL-driven JSON codec: JSON arguments to a Thrift call, and a Thrift reply to JSON, for
//! a struct with a dozen fields of mixed types and for the example IDL's `Echo`.
#![forbid(unsafe_code)]

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fnmesh_idl::{
    thrift_json::{decode_reply, decode_struct, encode_call, encode_struct, Protocol},
    Catalog,
};
use serde_json::json;

fn codec(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let types = Catalog::thrift_schema(root.join("tests/thrift/types.thrift"), &[]).unwrap();
    let all = types.structs.iter().position(|s| s.name == "All").unwrap();
    let twelve = json!({
        "b": true, "i8v": 7, "i16v": -300, "i32v": 123456, "i64v": "9007199254740993",
        "d": 3.25, "s": "a string of some length", "bin": "AAECAwQFBgc=", "color": "GREEN",
        "ints": [1, 2, 3, 4, 5], "tags": ["x", "y"], "inner": {"name": "in", "at": 5},
        "plain": "p"
    });
    let mut g = c.benchmark_group("thrift_json");
    g.throughput(Throughput::Elements(1));
    for (p, name) in [(Protocol::Binary, ""), (Protocol::Compact, ", Compact")] {
        let bytes = encode_struct(&types, all, &twelve, p).unwrap();
        g.bench_function(format!("encode a 13-field struct{name}"), |b| {
            b.iter(|| encode_struct(&types, all, &twelve, p).unwrap())
        });
        g.bench_function(format!("decode a 13-field struct{name}"), |b| {
            b.iter(|| decode_struct(&types, all, &bytes, p).unwrap())
        });
    }
    let echo = Catalog::thrift_schema(root.join("thrift/echo.thrift"), &[]).unwrap();
    let m = echo.service("EchoService").unwrap().method("Echo").unwrap();
    let args = json!({"message": "x".repeat(1000)});
    g.bench_function("encode Echo, 1 KB message", |b| {
        b.iter(|| encode_call(&echo, m, &args, 1, Protocol::Binary).unwrap())
    });
    let mut reply = vec![0x80, 0x01, 0x00, 0x02, 0, 0, 0, 4];
    reply.extend_from_slice(b"Echo");
    reply.extend_from_slice(&[0, 0, 0, 1, 12, 0, 0, 11, 0, 1]);
    reply.extend_from_slice(&1000u32.to_be_bytes());
    reply.extend_from_slice(&[b'x'; 1000]);
    reply.extend_from_slice(&[11, 0, 2, 0, 0, 0, 1, b'1', 0, 0]);
    assert!(decode_reply(&echo, m, &reply).is_ok());
    g.bench_function("decode Echo's reply, 1 KB message", |b| {
        b.iter(|| decode_reply(&echo, m, &reply).unwrap())
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
