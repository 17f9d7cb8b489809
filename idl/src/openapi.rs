//! An OpenAPI 3 document of the HTTP gateway's routes (`POST /{function}/{method}`), with request
//! and reply schemas made from Thrift IDLs by the JSON mapping of [`crate::thrift_json`], and
//! from `.proto` files by proto3's JSON mapping (openapi_proto).

use serde_json::{json, Map, Value};

use crate::proto_json::ProtoSchema;
use crate::schema::{FieldDef, Requiredness, Schema, StructKind, TType};

/// One function the gateway serves: its name, its IDL and the IDL service.
pub struct Served<'a> {
    pub function: &'a str,
    pub service: &'a str,
    pub idl: Idl<'a>,
}

/// A function's IDL.
pub enum Idl<'a> {
    Thrift(&'a Schema),
    Proto(&'a ProtoSchema),
}

/// A Thrift function's schema, for the helpers below.
struct Thrift<'a> {
    function: &'a str,
    schema: &'a Schema,
}

/// The document: a path per method of every function (gRPC: per unary method), components per
/// struct, enum and message (named `function.Type`).
pub fn document(served: &[Served<'_>]) -> Value {
    let mut paths = Map::new();
    let mut components = Map::new();
    components.insert("Error".into(), error_schema());
    for served in served {
        let schema = match served.idl {
            Idl::Thrift(schema) => schema,
            Idl::Proto(proto) => {
                let (function, service) = (served.function, served.service);
                crate::openapi_proto::routes(function, service, proto, &mut paths, &mut components);
                continue;
            }
        };
        let s = &Thrift {
            function: served.function,
            schema,
        };
        let Some(service) = s.schema.service(served.service) else {
            continue;
        };
        for (i, st) in s.schema.structs.iter().enumerate() {
            let mut object = object(s, &st.fields, true);
            if st.kind == StructKind::Union {
                object["minProperties"] = json!(1);
                object["maxProperties"] = json!(1);
            }
            components.insert(component(s, &TType::Struct(i)), object);
        }
        for (i, e) in s.schema.enums.iter().enumerate() {
            let names: Vec<&str> = e.values.iter().map(|(n, _)| n.as_str()).collect();
            components.insert(
                component(s, &TType::Enum(i)),
                json!({ "oneOf": [ {"type": "string", "enum": names}, {"type": "integer", "format": "int32"} ] }),
            );
        }
        for m in &service.methods {
            let ok = match &m.result {
                _ if m.oneway => {
                    json!({ "description": "accepted (oneway)", "content": { "application/json": { "schema": { "type": "object" } } } })
                }
                None => {
                    json!({ "description": "void", "content": { "application/json": { "schema": { "nullable": true } } } })
                }
                Some(t) => {
                    json!({ "description": "the result", "content": { "application/json": { "schema": schema_of(s, t) } } })
                }
            };
            let mut responses = Map::new();
            responses.insert(if m.oneway { "202" } else { "200" }.into(), ok);
            if !m.throws.is_empty() {
                let exceptions: Vec<Value> = m
                    .throws
                    .iter()
                    .map(|f| {
                        json!({
                            "type": "object",
                            "required": ["exception", "value"],
                            "properties": {
                                "exception": { "type": "string", "enum": [f.name] },
                                "value": schema_of(s, &f.ty),
                            },
                        })
                    })
                    .collect();
                responses.insert(
                    "422".into(),
                    json!({ "description": "a declared exception", "content": { "application/json": { "schema": { "oneOf": exceptions } } } }),
                );
            }
            errors(&mut responses, "the function's TApplicationException");
            let operation = operation(
                s.function,
                served.service,
                &m.name,
                object(s, &m.args, false),
                responses,
            );
            paths.insert(
                format!("/{}/{}", s.function, m.name),
                json!({ "post": operation }),
            );
        }
    }
    json!({
        "openapi": "3.0.3",
        "info": { "title": "fnmesh HTTP/JSON gateway", "version": "1" },
        "paths": paths,
        "components": { "schemas": components },
    })
}

/// fnmesh's error responses, with what a 502 means for the function's protocol.
pub(crate) fn errors(responses: &mut Map<String, Value>, bad_gateway: &str) {
    let error = json!({ "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } });
    for (code, what) in [
        ("400", "bad-request"),
        ("404", "no-route"),
        ("413", "too-large"),
        ("429", "overloaded"),
        ("502", bad_gateway),
        ("503", "circuit-open or unavailable"),
        ("504", "timeout"),
    ] {
        let mut e = error.clone();
        e["description"] = json!(what);
        responses.insert(code.into(), e);
    }
}

/// The `post` of `/{function}/{method}`.
pub(crate) fn operation(
    function: &str,
    service: &str,
    method: &str,
    request: Value,
    responses: Map<String, Value>,
) -> Value {
    json!({
        "operationId": format!("{function}.{method}"),
        "summary": format!("{service}.{method} ({function})"),
        "parameters": [{
            "name": "fnmesh-timeout", "in": "header", "required": false,
            "description": "the call's deadline, e.g. 500ms",
            "schema": { "type": "string" },
        }],
        "requestBody": {
            "required": true,
            "content": { "application/json": { "schema": request } },
        },
        "responses": responses,
    })
}

fn error_schema() -> Value {
    json!({
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": { "type": "string" },
            "message": { "type": "string" },
            "type": { "type": "integer", "description": "a TApplicationException's type" },
            "code": { "type": "integer", "description": "a gRPC status code" },
        },
    })
}

/// A component's name: the function, then the type (the same IDL type in two functions is
/// two components).
fn component(s: &Thrift<'_>, t: &TType) -> String {
    let name = match t {
        TType::Struct(i) => &s.schema.structs[*i].name,
        TType::Enum(i) => &s.schema.enums[*i].name,
        _ => unreachable!("only structs and enums are components"),
    };
    format!("{}.{name}", s.function)
}

/// An object of `fields`, no other properties allowed (unknown fields are refused); `named`:
/// a struct (a method's arguments are described by name only, though a one-struct method also
/// takes the struct itself).
fn object(s: &Thrift<'_>, fields: &[FieldDef], named: bool) -> Value {
    let mut properties = Map::new();
    let mut required = Vec::new();
    for f in fields {
        properties.insert(f.name.clone(), schema_of(s, &f.ty));
        if f.required == Requiredness::Required {
            required.push(f.name.clone());
        }
    }
    let mut o =
        json!({ "type": "object", "properties": properties, "additionalProperties": false });
    if !required.is_empty() {
        o["required"] = json!(required);
    }
    if !named {
        o["description"] = json!("the arguments by name");
    }
    o
}

fn schema_of(s: &Thrift<'_>, t: &TType) -> Value {
    match t {
        TType::Bool => json!({ "type": "boolean" }),
        TType::I8 => json!({ "type": "integer", "minimum": -128, "maximum": 127 }),
        TType::I16 => json!({ "type": "integer", "minimum": -32768, "maximum": 32767 }),
        TType::I32 => json!({ "type": "integer", "format": "int32" }),
        TType::I64 => json!({ "oneOf": [
            { "type": "integer", "format": "int64" },
            { "type": "string", "pattern": "^-?[0-9]+$" },
        ] }),
        TType::Double => json!({ "type": "number", "format": "double" }),
        TType::String => json!({ "type": "string" }),
        TType::Binary => json!({ "type": "string", "format": "byte" }),
        TType::Uuid => json!({ "type": "string", "format": "uuid" }),
        TType::List(e) => json!({ "type": "array", "items": schema_of(s, e) }),
        TType::Set(e) => json!({ "type": "array", "items": schema_of(s, e), "uniqueItems": true }),
        TType::Map(k, v) if matches!(**k, TType::String | TType::Enum(_)) => {
            json!({ "type": "object", "additionalProperties": schema_of(s, v) })
        }
        TType::Map(..) => json!({
            "type": "array",
            "description": "[key, value] pairs",
            "items": { "type": "array", "minItems": 2, "maxItems": 2, "items": {} },
        }),
        TType::Struct(_) | TType::Enum(_) => {
            json!({ "$ref": format!("#/components/schemas/{}", component(s, t)) })
        }
    }
}
