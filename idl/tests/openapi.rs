//! The OpenAPI document of the gateway's routes, from a Thrift IDL and a `.proto` file: the
//! schemas follow the JSON mappings, and the document validates as OpenAPI 3
//! (`openapi-spec-validator`, from PyPI, which tests/run.sh installs).
#![forbid(unsafe_code)]

use std::path::Path;

use fnmesh_idl::{
    openapi::{document, Idl, Served},
    proto_json::ProtoSchema,
    Catalog,
};
use serde_json::{json, Value};

fn doc() -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let thrift = Catalog::thrift_schema(root.join("tests/thrift/types.thrift"), &[]).unwrap();
    let proto = ProtoSchema::load(&root.join("tests/proto/types.proto"), &[]).unwrap();
    document(&[
        Served {
            function: "tt",
            service: "Types",
            idl: Idl::Thrift(&thrift),
        },
        Served {
            function: "pt",
            service: "types.Types",
            idl: Idl::Proto(&proto),
        },
    ])
}

#[test]
fn grpc_routes_follow_proto3_json() {
    let v = doc();
    let paths = v["paths"].as_object().unwrap();
    assert!(paths.contains_key("/tt/Roundtrip") && paths.contains_key("/pt/Roundtrip"));
    assert!(
        !paths.contains_key("/pt/Watch"),
        "streaming methods have no route"
    );
    let op = &v["paths"]["/pt/Roundtrip"]["post"];
    let all_ref = json!({"$ref": "#/components/schemas/pt.types.All"});
    assert_eq!(
        op["requestBody"]["content"]["application/json"]["schema"],
        all_ref
    );
    assert_eq!(
        op["responses"]["200"]["content"]["application/json"]["schema"],
        all_ref
    );
    assert!(op["responses"]["502"]["description"]
        .as_str()
        .unwrap()
        .contains("grpc-status"));
    let all = &v["components"]["schemas"]["pt.types.All"]["properties"];
    assert_eq!(
        all["big"]["oneOf"][0]["type"], "string",
        "int64 as a string"
    );
    assert_eq!(all["small"]["minimum"], 0);
    assert_eq!(all["blob"]["format"], "byte");
    assert_eq!(all["color"]["$ref"], "#/components/schemas/pt.types.Color");
    assert_eq!(all["tags"]["items"]["type"], "string");
    assert_eq!(
        all["byName"]["additionalProperties"]["$ref"], "#/components/schemas/pt.types.Inner",
        "maps are objects; names in lowerCamelCase"
    );
    assert_eq!(all["at"]["format"], "date-time", "Timestamp as RFC 3339");
    assert_eq!(
        all["maybe"]["nullable"], true,
        "a wrapper is its value or null"
    );
    assert_eq!(all["child"], all_ref, "recursion through a reference");
    assert!(all["text"].is_object() && all["number"].is_object());
    let color = &v["components"]["schemas"]["pt.types.Color"]["oneOf"][0]["enum"];
    assert_eq!(*color, json!(["COLOR_UNSPECIFIED", "RED"]));
    assert!(v["components"]["schemas"]["tt.All"].is_object());
}

#[test]
fn the_document_validates_as_openapi_3() {
    let file = std::env::temp_dir().join(format!("fnmesh-idl-openapi-{}.json", std::process::id()));
    std::fs::write(&file, serde_json::to_vec(&doc()).unwrap()).unwrap();
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys; from openapi_spec_validator import validate; validate(json.load(open(sys.argv[1])))",
        ])
        .arg(&file)
        .output()
        .expect("python3 runs");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
