//! JSON to protobuf and back for gRPC functions, with proto3's canonical JSON mapping: the
//! `.proto` file is compiled at run time (protox) and messages are built and read from its
//! descriptors (prost-reflect).

use std::path::{Path, PathBuf};

use prost::Message;
pub use prost_reflect::MethodDescriptor;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage};
use serde_json::Value;

use crate::{thrift_json::DecodeError, thrift_json::JsonError, IdlError};

/// A `.proto` file's descriptors (with its imports).
#[derive(Debug, Clone)]
pub struct ProtoSchema {
    pool: DescriptorPool,
}

impl PartialEq for ProtoSchema {
    fn eq(&self, other: &Self) -> bool {
        self.pool.encode_to_vec() == other.pool.encode_to_vec()
    }
}

impl ProtoSchema {
    /// Compiles `path`, imports resolved next to it and in `include_dirs`.
    pub fn load(path: &Path, include_dirs: &[PathBuf]) -> Result<ProtoSchema, IdlError> {
        let mut includes: Vec<PathBuf> = vec![path.parent().unwrap_or(Path::new(".")).to_owned()];
        includes.extend(include_dirs.iter().cloned());
        let file = path.file_name().map(PathBuf::from).unwrap_or_default();
        let fail = |message: String| IdlError::Service {
            path: path.to_owned(),
            message,
        };
        let set = protox::compile([file], includes).map_err(|e| fail(e.to_string()))?;
        let pool =
            DescriptorPool::from_file_descriptor_set(set).map_err(|e| fail(e.to_string()))?;
        Ok(ProtoSchema { pool })
    }

    pub(crate) fn pool(&self) -> &DescriptorPool {
        &self.pool
    }

    /// The name of the only field of `method`'s request when it is a single `bytes` (what a
    /// queue message's raw bytes fill).
    pub fn raw_field(&self, service: &str, method: &str) -> Option<String> {
        let input = self.method(service, method)?.input();
        let mut fields = input.fields();
        match (fields.next(), fields.next()) {
            (Some(f), None) if f.kind() == prost_reflect::Kind::Bytes && !f.is_list() => {
                Some(f.name().to_owned())
            }
            _ => None,
        }
    }

    /// `service` (`package.Service`)'s `method`.
    pub fn method(&self, service: &str, method: &str) -> Option<MethodDescriptor> {
        self.pool
            .get_service_by_name(service)?
            .methods()
            .find(|m| m.name() == method)
    }
}

/// The request message of `method` from JSON (proto3 JSON: field names in lowerCamelCase or as
/// declared, 64-bit integers as numbers or strings, enums by name or number, bytes as base64);
/// unknown fields are refused.
pub fn encode_request(method: &MethodDescriptor, json: &Value) -> Result<Vec<u8>, JsonError> {
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let empty = Value::Object(Default::default());
    let json = if json.is_null() { &empty } else { json };
    let message = DynamicMessage::deserialize_with_options(method.input(), json, &options)
        .map_err(|e| JsonError {
            path: method.input().full_name().to_owned(),
            message: e.to_string(),
        })?;
    Ok(message.encode_to_vec())
}

/// A response message of `method` as JSON (fields with their default values included).
pub fn decode_response(method: &MethodDescriptor, bytes: &[u8]) -> Result<Value, DecodeError> {
    let message =
        DynamicMessage::decode(method.output(), bytes).map_err(|e| DecodeError(e.to_string()))?;
    let options = prost_reflect::SerializeOptions::new().skip_default_fields(false);
    let mut out = serde_json::Serializer::new(Vec::new());
    message
        .serialize_with_options(&mut out, &options)
        .map_err(|e| DecodeError(e.to_string()))?;
    serde_json::from_slice(&out.into_inner()).map_err(|e| DecodeError(e.to_string()))
}
