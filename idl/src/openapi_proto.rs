//! The gateway's routes for a gRPC function in the OpenAPI document: one per unary method,
//! with schemas from the `.proto` descriptors by proto3's canonical JSON mapping (field names
//! in lowerCamelCase, 64-bit integers as strings or numbers, the well-known types by their
//! JSON forms).

use std::collections::BTreeSet;

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{json, Map, Value};

use crate::openapi::{errors, operation};
use crate::proto_json::ProtoSchema;

/// Adds `function`'s unary methods of `service` to `paths`, and the messages and enums they
/// use to `components`.
pub(crate) fn routes(
    function: &str,
    service: &str,
    proto: &ProtoSchema,
    paths: &mut Map<String, Value>,
    components: &mut Map<String, Value>,
) {
    let Some(svc) = proto.pool().get_service_by_name(service) else {
        return;
    };
    let mut w = Walk {
        function,
        pending: Vec::new(),
        seen: BTreeSet::new(),
    };
    for m in svc.methods() {
        if m.is_client_streaming() || m.is_server_streaming() {
            continue;
        }
        let mut responses = Map::new();
        let ok = json!({ "description": "the response", "content": { "application/json": { "schema": w.message(&m.output()) } } });
        responses.insert("200".into(), ok);
        errors(
            &mut responses,
            "the function's gRPC status: {\"error\": \"grpc-status\", \"code\", \"message\"}",
        );
        let request = w.message(&m.input());
        paths.insert(
            format!("/{function}/{}", m.name()),
            json!({ "post": operation(function, service, m.name(), request, responses) }),
        );
    }
    while let Some(message) = w.pending.pop() {
        let mut properties = Map::new();
        for f in message.fields() {
            properties.insert(f.json_name().to_owned(), w.field(&f));
        }
        let schema = json!({
            "type": "object",
            "properties": properties,
            "additionalProperties": false,
            "description": "proto3 JSON: fields by their JSON (lowerCamelCase) names; the names as declared are taken too",
        });
        components.insert(w.component(message.full_name()), schema);
    }
    for e in w
        .seen
        .iter()
        .filter_map(|n| proto.pool().get_enum_by_name(n))
    {
        let names: Vec<String> = e.values().map(|v| v.name().to_owned()).collect();
        components.insert(
            w.component(e.full_name()),
            json!({ "oneOf": [ {"type": "string", "enum": names}, {"type": "integer", "format": "int32"} ] }),
        );
    }
}

/// Messages and enums met, to be written as components.
struct Walk<'a> {
    function: &'a str,
    pending: Vec<MessageDescriptor>,
    /// Full names of the messages and enums met (enums are written at the end).
    seen: BTreeSet<String>,
}

impl Walk<'_> {
    fn component(&self, full_name: &str) -> String {
        format!("{}.{full_name}", self.function)
    }

    fn reference(&self, full_name: &str) -> Value {
        json!({ "$ref": format!("#/components/schemas/{}", self.component(full_name)) })
    }

    /// A message's schema: a well-known type's JSON form, else a reference to its component.
    fn message(&mut self, m: &MessageDescriptor) -> Value {
        if let Some(wkt) = well_known(m.full_name()) {
            return wkt;
        }
        if self.seen.insert(m.full_name().to_owned()) {
            self.pending.push(m.clone());
        }
        self.reference(m.full_name())
    }

    fn field(&mut self, f: &FieldDescriptor) -> Value {
        if f.is_map() {
            let Kind::Message(entry) = f.kind() else {
                return json!({ "type": "object" });
            };
            let value = self.kind(&entry.map_entry_value_field().kind());
            return json!({ "type": "object", "additionalProperties": value });
        }
        let one = self.kind(&f.kind());
        match f.is_list() {
            true => json!({ "type": "array", "items": one }),
            false => one,
        }
    }

    fn kind(&mut self, k: &Kind) -> Value {
        match k {
            Kind::Double | Kind::Float => json!({ "oneOf": [
                { "type": "number" },
                { "type": "string", "enum": ["NaN", "Infinity", "-Infinity"] },
            ] }),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                json!({ "type": "integer", "format": "int32" })
            }
            Kind::Uint32 | Kind::Fixed32 => {
                json!({ "type": "integer", "minimum": 0, "maximum": u32::MAX })
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
                json!({ "oneOf": [
                    { "type": "string", "pattern": "^-?[0-9]+$" },
                    { "type": "integer", "format": "int64" },
                ], "description": "64-bit: a string of digits in replies" })
            }
            Kind::Bool => json!({ "type": "boolean" }),
            Kind::String => json!({ "type": "string" }),
            Kind::Bytes => json!({ "type": "string", "format": "byte" }),
            Kind::Message(m) => self.message(m),
            Kind::Enum(e) if e.full_name() == "google.protobuf.NullValue" => {
                json!({ "nullable": true, "enum": [null] })
            }
            Kind::Enum(e) => {
                self.seen.insert(e.full_name().to_owned());
                self.reference(e.full_name())
            }
        }
    }
}

/// The JSON form of a well-known type (proto3's JSON mapping), if `name` is one.
fn well_known(name: &str) -> Option<Value> {
    let int64 = json!({ "type": "string", "pattern": "^-?[0-9]+$" });
    Some(match name.strip_prefix("google.protobuf.")? {
        "Timestamp" => json!({ "type": "string", "format": "date-time" }),
        "Duration" => json!({ "type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$" }),
        "FieldMask" => json!({ "type": "string" }),
        "Struct" => json!({ "type": "object", "additionalProperties": true }),
        "Value" => json!({}),
        "ListValue" => json!({ "type": "array", "items": {} }),
        "Empty" => json!({ "type": "object", "additionalProperties": false }),
        "Any" => {
            json!({ "type": "object", "required": ["@type"], "properties": { "@type": { "type": "string" } } })
        }
        "DoubleValue" | "FloatValue" => json!({ "type": "number", "nullable": true }),
        "Int64Value" | "UInt64Value" => {
            let mut v = int64;
            v["nullable"] = json!(true);
            v
        }
        "Int32Value" | "UInt32Value" => json!({ "type": "integer", "nullable": true }),
        "BoolValue" => json!({ "type": "boolean", "nullable": true }),
        "StringValue" => json!({ "type": "string", "nullable": true }),
        "BytesValue" => json!({ "type": "string", "format": "byte", "nullable": true }),
        _ => return None,
    })
}
