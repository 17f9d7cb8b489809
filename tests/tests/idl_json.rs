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
    thrift_json::{decode_reply, encode_call, Reply},
    Catalog,
};
use fnmesh_tests::{bench::start_function, sidecar::bin};
use serde_json::{json, Value};

fn schema() -> Schema {
    let idl = fnmesh_tests::sidecar::idl("tests/thrift/types.thrift");
    Catalog::thrift_schema(idl, &[]).unwrap()
}

/// One Framed Binary call of `method` with `args`, and its reply read back.
fn call(conn: &mut TcpStream, s: &Schema, method: &str, args: &Value) -> Reply {
    let m = s.service("Types").unwrap().method(method).unwrap();
    let message = encode_call(s, m, args, 1).unwrap();
    let mut frame = (message.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&message);
    conn.write_all(&frame).unwrap();
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).unwrap();
    let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
    conn.read_exact(&mut reply).unwrap();
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

#[test]
fn every_type_round_trips_through_a_real_volo_server() {
    let (_server, addr) = start_function(&bin("types-fn"));
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let s = schema();
    assert_eq!(
        call(&mut conn, &s, "Roundtrip", &all()),
        Reply::Success(all())
    );
    // The struct as the whole body, as Kitex's JSON generic call takes it.
    let mut oops = all();
    oops["s"] = json!("oops");
    oops["i32v"] = json!(42);
    assert_eq!(
        call(&mut conn, &s, "Roundtrip", &oops),
        Reply::Declared {
            field: "oops".into(),
            value: json!({"code": 42, "why": "asked for"})
        }
    );
    assert_eq!(
        call(&mut conn, &s, "Two", &json!({"a": 40, "b": "xy"})),
        Reply::Success(json!(42))
    );
    assert_eq!(
        call(&mut conn, &s, "Nothing", &json!({})),
        Reply::Success(Value::Null)
    );
}
