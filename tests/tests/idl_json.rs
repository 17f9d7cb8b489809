//! The IDL-driven JSON codec against a real Volo server: JSON arguments encoded from the IDL at
//! run time, decoded by Volo's generated code, sent back by it, and read again as JSON.
#![forbid(unsafe_code)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use fnmesh_idl::{
    schema::Schema,
    thrift_json::{decode_reply, encode_call, encode_struct, Protocol, Reply},
    Catalog,
};
use fnmesh_tests::{
    bench::{start_function, wait_listening, Killed},
    sidecar::bin,
};
use serde_json::{json, Value};

fn schema() -> Schema {
    let idl = fnmesh_tests::sidecar::idl("tests/thrift/types.thrift");
    Catalog::thrift_schema(idl, &[]).unwrap()
}

/// One Framed call of `method` with `args` in protocol `p`, and its reply (in the same
/// protocol, as Volo answers) read back.
fn call(conn: &mut TcpStream, s: &Schema, p: Protocol, method: &str, args: &Value) -> Reply {
    let m = s.service("Types").unwrap().method(method).unwrap();
    let message = encode_call(s, m, args, 1, p).unwrap();
    let mut frame = (message.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&message);
    conn.write_all(&frame).unwrap();
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).unwrap();
    let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
    conn.read_exact(&mut reply).unwrap();
    assert_eq!(Protocol::of_message(&reply), p, "the reply's protocol");
    decode_reply(s, m, &reply).unwrap()
}

/// Every type with its extremes (idl/tests/thrift/all.json; sets and maps of one entry, whose
/// order a Volo server keeps).
fn all() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fnmesh_tests::sidecar::idl("tests/thrift/all.json")).unwrap(),
    )
    .unwrap()
}

/// Every method with every type, in protocol `p`, against the server on `conn`; `compact_bonus`
/// is what the server adds to `Two` when it decoded a Compact call.
fn round_trips(conn: &mut TcpStream, p: Protocol, compact_bonus: i64) {
    let s = schema();
    assert_eq!(
        call(conn, &s, p, "Roundtrip", &all()),
        Reply::Success(all()),
        "{p:?}"
    );
    // The struct as the whole body, as Kitex's JSON generic call takes it.
    let mut oops = all();
    oops["s"] = json!("oops");
    oops["i32v"] = json!(42);
    assert_eq!(
        call(conn, &s, p, "Roundtrip", &oops),
        Reply::Declared {
            field: "oops".into(),
            value: json!({"code": 42, "why": "asked for"})
        },
        "{p:?}"
    );
    two_and_nothing(conn, p, compact_bonus);
}

/// The methods whose arguments hold no bool.
fn two_and_nothing(conn: &mut TcpStream, p: Protocol, compact_bonus: i64) {
    let s = schema();
    let bonus = if p == Protocol::Compact {
        compact_bonus
    } else {
        0
    };
    assert_eq!(
        call(conn, &s, p, "Two", &json!({"a": 40, "b": "xy"})),
        Reply::Success(json!(42 + bonus)),
        "{p:?}"
    );
    assert_eq!(
        call(conn, &s, p, "Nothing", &json!({})),
        Reply::Success(Value::Null),
        "{p:?}"
    );
}

#[test]
fn every_type_round_trips_through_a_real_volo_server() {
    let (_server, addr) = start_function(&bin("types-fn"));
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    round_trips(&mut conn, Protocol::Binary, 0);
    // Compact: types-fn adds 1,000,000 to `Two` when Volo decoded the call as Compact. Volo
    // (pilota 0.13) panics decoding a Compact struct with a bool field, so `Roundtrip` in
    // Compact is checked against thriftpy2 below instead.
    two_and_nothing(&mut conn, Protocol::Compact, 1_000_000);
}

#[test]
fn every_type_round_trips_through_thriftpy2_in_compact() {
    let port = fnmesh_tests::sidecar::free_port();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/types_compact_server.py");
    let server = std::process::Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("python3 runs");
    let _server = Killed(server);
    wait_listening(([127, 0, 0, 1], port).into());
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    round_trips(&mut conn, Protocol::Compact, 0);
    // What thriftpy2 reads from fnmesh's Compact is what the JSON meant.
    let s = schema();
    let i = s.structs.iter().position(|x| x.name == "All").unwrap();
    let bytes = encode_struct(&s, i, &all(), Protocol::Compact).unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let read = fnmesh_tests::sidecar::python("types_compact_server.py", &["decode", &hex]);
    let read: Value = serde_json::from_str(&read.join("")).unwrap();
    assert_eq!(read, all());
}
