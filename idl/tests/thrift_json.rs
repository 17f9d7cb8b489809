//! The JSON codec against an IDL that uses every Thrift type: JSON in equals JSON out, errors
//! name the field, replies and exceptions read back.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use fnmesh_idl::{
    schema::{Schema, TType},
    thrift_json::{decode_reply, decode_struct, encode_call, encode_struct, Protocol, Reply},
    Catalog,
};
use serde_json::{json, Value};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/thrift")
}

fn schema() -> Schema {
    Catalog::thrift_schema(dir().join("types.thrift"), &[]).unwrap()
}

fn index(s: &Schema, name: &str) -> usize {
    s.structs.iter().position(|x| x.name == name).unwrap()
}

/// Every type with its extremes (idl/tests/thrift/all.json; sets and maps of one entry, whose
/// order a Volo server keeps).
fn all() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("all.json")).unwrap()).unwrap()
}

#[test]
fn every_type_round_trips_json_in_equals_json_out() {
    let s = schema();
    let i = index(&s, "All");
    for p in [Protocol::Binary, Protocol::Compact] {
        let round = |v: &Value| decode_struct(&s, i, &encode_struct(&s, i, v, p).unwrap(), p);
        assert_eq!(round(&all()).unwrap(), all(), "{p:?}");
        // i64 also as a string; enums also by number: they come back canonical.
        let mut v = all();
        v["i64v"] = json!("9223372036854775807");
        v["color"] = json!(10);
        assert_eq!(round(&v).unwrap(), all(), "{p:?}");
        // An enum number the IDL does not declare comes back as a number.
        v["color"] = json!(99);
        assert_eq!(round(&v).unwrap()["color"], json!(99), "{p:?}");
    }
}

#[test]
fn compact_is_written_as_the_spec_lays_it_out() {
    let s = schema();
    let two = s.service("Types").unwrap().method("Two").unwrap();
    let call = encode_call(&s, two, &json!({"a": -7, "b": "x"}), 300, Protocol::Compact).unwrap();
    let want = [
        0x82, 0x21, // protocol id; CALL << 5 | version 1
        0xac, 0x02, // seqid 300 as a varint
        3, b'T', b'w', b'o', // name
        0x15, 13, // field 1 (delta 1), i32: zigzag(-7) = 13
        0x18, 1, b'x', // field 2 (delta 1), binary of 1 byte
        0,    // stop
    ];
    assert_eq!(call, want);
    // Bools ride in the field header; a jump of more than 15 writes the id as a zigzag
    // varint; a list of more than 14 has its count after the header byte.
    let i = index(&s, "Inner");
    let inner = encode_struct(&s, i, &json!({"name": "", "at": 1}), Protocol::Compact).unwrap();
    assert_eq!(inner, [0x18, 0, 0x16, 2, 0]);
    let a = index(&s, "All");
    let mut v = all();
    let keep = [
        "b", "i8v", "i16v", "i32v", "i64v", "d", "s", "plain", "flags",
    ];
    v.as_object_mut()
        .unwrap()
        .retain(|k, _| keep.contains(&k.as_str()));
    let bytes = encode_struct(&s, a, &v, Protocol::Compact).unwrap();
    assert_eq!(bytes[0], 0x11, "field 1, bool true in the header");
    let flags = bytes.len() - 1 - 17 - 4;
    assert_eq!(&bytes[flags..flags + 4], &[0x09, 80, 0xf1, 17]);
    assert_eq!(&bytes[flags + 4..flags + 6], &[1, 2], "true, false");
}

#[test]
fn errors_name_the_field() {
    let s = schema();
    let i = index(&s, "All");
    let bad = |f: &dyn Fn(&mut Value)| {
        let mut v = all();
        f(&mut v);
        encode_struct(&s, i, &v, Protocol::Binary)
            .unwrap_err()
            .to_string()
    };
    let e = bad(&|v| v["i8v"] = json!(128));
    assert!(e.starts_with("i8v: expected an i8"), "{e}");
    let e = bad(&|v| v["ints"][1] = json!("one"));
    assert!(e.starts_with("ints[1]: expected an i32"), "{e}");
    let e = bad(&|v| {
        v.as_object_mut().unwrap().remove("s");
    });
    assert_eq!(e, "s: required field missing");
    let e = bad(&|v| v["nope"] = json!(1));
    assert!(e.starts_with("nope: unknown field"), "{e}");
    let e = bad(&|v| v["inner"]["extra"] = json!(1));
    assert!(e.starts_with("inner.extra: unknown field"), "{e}");
    let e = bad(&|v| v["choice"] = json!({"text": "a", "number": 1}));
    assert!(
        e.contains("choice: a union takes exactly one field, got 2"),
        "{e}"
    );
    let e = bad(&|v| v["color"] = json!("PINK"));
    assert!(e.starts_with("color: \"PINK\" is not a Color"), "{e}");
    let e = bad(&|v| v["bin"] = json!("not base64!"));
    assert!(e.starts_with("bin: expected base64"), "{e}");
    let e = bad(&|v| v["by_number"] = json!({"7": []}));
    assert!(
        e.starts_with("by_number: expected an array of [key, value] pairs"),
        "{e}"
    );
    let e = bad(&|v| v["by_number"][0] = json!([7]));
    assert!(
        e.starts_with("by_number[0]: expected a [key, value] pair"),
        "{e}"
    );
    let e = bad(&|v| v["b"] = json!(1));
    assert!(e.starts_with("b: expected a boolean"), "{e}");
    let e = bad(&|v| v["i64v"] = json!("12x"));
    assert!(e.starts_with("i64v: expected an i64"), "{e}");
    let e = bad(&|v| v["child"]["child"] = json!(3));
    assert!(e.starts_with("child.child: expected an object"), "{e}");
}

#[test]
fn calls_encode_by_argument_name_or_as_the_one_struct_and_replies_decode() {
    let s = schema();
    let svc = s.service("Types").unwrap();
    let two = svc.method("Two").unwrap();
    let call = encode_call(&s, two, &json!({"a": 7, "b": "x"}), 9, Protocol::Binary).unwrap();
    // Strict binary CALL, name, seqid, then field 1 (i32) and field 2 (string).
    assert_eq!(&call[..4], &[0x80, 0x01, 0x00, 0x01]);
    assert_eq!(&call[4..11], b"\0\0\0\x03Two");
    assert_eq!(&call[11..15], &[0, 0, 0, 9]);
    assert_eq!(&call[15..22], &[8, 0, 1, 0, 0, 0, 7]);
    let e = encode_call(&s, two, &json!({"a": 7, "c": 1}), 1, Protocol::Binary).unwrap_err();
    assert!(e.to_string().starts_with("c: unknown field"), "{e}");
    // One struct argument: by name, or the struct as the whole body.
    let rt = svc.method("Roundtrip").unwrap();
    let by_name = encode_call(&s, rt, &json!({"all": all()}), 1, Protocol::Binary).unwrap();
    let whole = encode_call(&s, rt, &all(), 1, Protocol::Binary).unwrap();
    assert_eq!(by_name, whole);
    // Replies: success, a declared exception, a TApplicationException, void.
    let i = index(&s, "All");
    let mut reply = vec![0x80, 0x01, 0x00, 0x02, 0, 0, 0, 9];
    reply.extend_from_slice(b"Roundtrip");
    reply.extend_from_slice(&[0, 0, 0, 1]);
    let head = reply.clone();
    reply.extend_from_slice(&[12, 0, 0]);
    reply.extend_from_slice(&encode_struct(&s, i, &all(), Protocol::Binary).unwrap());
    reply.push(0);
    assert_eq!(decode_reply(&s, rt, &reply).unwrap(), Reply::Success(all()));
    let mut oops = head.clone();
    oops.extend_from_slice(&[12, 0, 1, 8, 0, 1, 0, 0, 0, 42, 0, 0]);
    assert_eq!(
        decode_reply(&s, rt, &oops).unwrap(),
        Reply::Declared {
            field: "oops".into(),
            value: json!({"code": 42})
        }
    );
    let mut app = vec![0x80, 0x01, 0x00, 0x03, 0, 0, 0, 9];
    app.extend_from_slice(b"Roundtrip");
    app.extend_from_slice(&[0, 0, 0, 1]);
    app.extend_from_slice(&[11, 0, 1, 0, 0, 0, 2, b'n', b'o', 8, 0, 2, 0, 0, 0, 1, 0]);
    assert_eq!(
        decode_reply(&s, rt, &app).unwrap(),
        Reply::Application {
            kind: 1,
            message: "no".into()
        }
    );
    let nothing = svc.method("Nothing").unwrap();
    let mut void = vec![0x80, 0x01, 0x00, 0x02, 0, 0, 0, 7];
    void.extend_from_slice(b"Nothing");
    void.extend_from_slice(&[0, 0, 0, 1, 0]);
    assert_eq!(
        decode_reply(&s, nothing, &void).unwrap(),
        Reply::Success(Value::Null)
    );
    // Extends: the parent's methods are there; types resolve through typedefs and includes.
    let more = s.service("MoreTypes").unwrap();
    assert!(more.method("More").is_some() && more.method("Two").is_some());
    let inner = &s.structs[index(&s, "Inner")];
    assert_eq!(inner.fields[1].ty, TType::I64);
}

/// A REPLY to `Roundtrip` holding `All` as its success, in protocol `p`.
fn roundtrip_reply(s: &Schema, p: Protocol) -> Vec<u8> {
    let i = index(s, "All");
    let mut reply = match p {
        Protocol::Binary => {
            let mut r = vec![0x80, 0x01, 0x00, 0x02, 0, 0, 0, 9];
            r.extend_from_slice(b"Roundtrip");
            r.extend_from_slice(&[0, 0, 0, 1, 12, 0, 0]);
            r
        }
        // REPLY << 5 | 1, seqid 1, the name; field 0 as a struct (id in the long form).
        Protocol::Compact => [&[0x82, 0x41, 1, 9][..], b"Roundtrip", &[0x0c, 0]].concat(),
    };
    reply.extend_from_slice(&encode_struct(s, i, &all(), p).unwrap());
    reply.push(0);
    reply
}

#[test]
fn compact_replies_decode_like_binary_ones() {
    let s = schema();
    let rt = s.service("Types").unwrap().method("Roundtrip").unwrap();
    let reply = roundtrip_reply(&s, Protocol::Compact);
    assert_eq!(decode_reply(&s, rt, &reply).unwrap(), Reply::Success(all()));
    // A declared exception: field 1, a struct holding code 42 (zigzag 84).
    let oops = [
        &[0x82, 0x41, 1, 9][..],
        b"Roundtrip",
        &[0x1c, 0x15, 84, 0, 0],
    ]
    .concat();
    assert_eq!(
        decode_reply(&s, rt, &oops).unwrap(),
        Reply::Declared {
            field: "oops".into(),
            value: json!({"code": 42})
        }
    );
}

#[test]
fn truncated_or_corrupt_replies_are_errors_never_panics() {
    let s = schema();
    let rt = s.service("Types").unwrap().method("Roundtrip").unwrap();
    for p in [Protocol::Binary, Protocol::Compact] {
        let reply = roundtrip_reply(&s, p);
        for n in 0..reply.len() {
            let _ = decode_reply(&s, rt, &reply[..n]);
            for b in [0u8, 0x7f, 0x80, 0xff] {
                let mut x = reply.clone();
                x[n] = b;
                let _ = decode_reply(&s, rt, &x);
            }
        }
        assert!(decode_reply(&s, rt, &reply[..reply.len() - 1]).is_err());
    }
}

#[test]
fn the_example_idl_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("thrift/echo.thrift");
    let s = Catalog::thrift_schema(root, &[]).unwrap();
    let echo = s.service("EchoService").unwrap().method("Echo").unwrap();
    let call = encode_call(
        &s,
        echo,
        &json!({"message": "hi", "sleep_ms": "5"}),
        3,
        Protocol::Binary,
    )
    .unwrap();
    assert!(call.windows(2).any(|w| w == b"hi"));
}
