//! Protobuf JSON from a `.proto` compiled at run time.
#![forbid(unsafe_code)]

use std::path::Path;

use fnmesh_idl::proto_json::{decode_response, encode_request, ProtoSchema};
use serde_json::json;

#[test]
fn proto3_json_in_and_out_and_refusals() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/echo.proto");
    let schema = ProtoSchema::load(&root, &[]).unwrap();
    let m = schema.method("echo.Echo", "UnaryEcho").unwrap();
    // EchoRequest and EchoResponse share field 1 (message): a request reads back as a response.
    let bytes = encode_request(&m, &json!({"message": "hi", "sleepMs": "5"})).unwrap();
    assert_eq!(&bytes[..4], &[0x0a, 2, b'h', b'i']);
    assert_eq!(&bytes[4..], &[0x10, 5]);
    assert_eq!(
        decode_response(&m, &bytes[..4]).unwrap(),
        json!({"message": "hi", "instance": ""})
    );
    // The declared name works too; unknown fields and wrong types are refused.
    assert!(encode_request(&m, &json!({"sleep_ms": 1})).is_ok());
    let e = encode_request(&m, &json!({"bogus": 1})).unwrap_err();
    assert!(e.to_string().contains("bogus"), "{e}");
    let e = encode_request(&m, &json!({"message": 5})).unwrap_err();
    assert!(e.to_string().contains("echo.EchoRequest"), "{e}");
    assert!(schema.method("echo.Echo", "Nope").is_none());
    assert!(decode_response(&m, &[0x0a, 9]).is_err());
}

#[test]
fn a_method_whose_request_is_one_bytes_field_has_a_raw_field() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/proto/types.proto");
    let schema = ProtoSchema::load(&root, &[]).unwrap();
    assert_eq!(
        schema.raw_field("types.Types", "Eat").as_deref(),
        Some("data")
    );
    assert_eq!(schema.raw_field("types.Types", "Roundtrip"), None);
    assert_eq!(schema.raw_field("types.Types", "Nope"), None);
}
