//! JSON to Thrift and back, driven by a [`Schema`] at run time (written here: no crate encodes
//! Thrift from an IDL it reads while running). The mapping (docs/json.md): fields by their IDL
//! names; i64 as a number or a string of digits; binary as base64; enums by name or number (out:
//! by name when declared); lists and sets as arrays; maps with string (or enum) keys as objects,
//! others as arrays of `[key, value]`; required fields enforced, unknown fields refused. Binary
//! (strict) or Compact messages, by [`Protocol`] (thrift_wire has the protocols).

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use serde_json::{Map, Number, Value};

use crate::schema::{FieldDef, MethodDef, Requiredness, Schema, StructKind, TType};
pub use crate::thrift_wire::Protocol;
use crate::thrift_wire::*;

/// Why JSON does not fit the IDL: where (`req.items[2].name`) and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct JsonError {
    pub path: String,
    pub message: String,
}

/// Why a reply cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read the reply: {0}")]
pub struct DecodeError(pub String);

/// A reply, read.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The method's result (`null` for `void`).
    Success(Value),
    /// One of the method's declared exceptions: the `throws` field's name and the exception.
    Declared { field: String, value: Value },
    /// A TApplicationException: its type and message.
    Application { kind: i32, message: String },
}

/// Containers and structs nested deeper than this are refused (both ways).
const MAX_DEPTH: usize = 64;

fn wire_type(t: &TType) -> u8 {
    match t {
        TType::Bool => T_BOOL,
        TType::I8 => T_BYTE,
        TType::I16 => T_I16,
        TType::I32 | TType::Enum(_) => T_I32,
        TType::I64 => T_I64,
        TType::Double => T_DOUBLE,
        TType::String | TType::Binary => T_STRING,
        TType::Uuid => T_UUID,
        TType::List(_) => T_LIST,
        TType::Set(_) => T_SET,
        TType::Map(..) => T_MAP,
        TType::Struct(_) => T_STRUCT,
    }
}

/// A method call's message (CALL, or ONEWAY for a oneway method) with `args` as its
/// arguments: an object of the arguments by name, or, for a method with one struct argument,
/// that struct itself (as Kitex's JSON generic call takes it).
pub fn encode_call(
    schema: &Schema,
    method: &MethodDef,
    args: &Value,
    seqid: i32,
    proto: Protocol,
) -> Result<Vec<u8>, JsonError> {
    let mut out = Out::new(proto, 128);
    out.message(if method.oneway { 4 } else { 1 }, &method.name, seqid);
    let by_name = match args {
        Value::Object(o) => o.keys().all(|k| method.args.iter().any(|a| a.name == *k)),
        Value::Null => true,
        _ => false,
    };
    let whole = match method.args.as_slice() {
        [only] if !by_name => matches!(only.ty, TType::Struct(_)),
        _ => false,
    };
    let mut w = Writer { schema, out };
    if whole {
        // The body is the one struct argument: its field, then the arguments' stop.
        let arg = &method.args[0];
        let outer = w.out.struct_begin();
        w.out.field(wire_type(&arg.ty), arg.id);
        w.value(&arg.ty, args, &arg.name, 1)?;
        w.out.struct_end(outer);
    } else {
        let empty = Value::Object(Map::new());
        let args = if args.is_null() { &empty } else { args };
        w.fields(&method.args, args, "", StructKind::Struct, 0)?;
    }
    Ok(w.out.buf)
}

/// A struct of type `index` from JSON (what [`decode_struct`] gives back).
pub fn encode_struct(
    schema: &Schema,
    index: usize,
    value: &Value,
    proto: Protocol,
) -> Result<Vec<u8>, JsonError> {
    let mut w = Writer {
        schema,
        out: Out::new(proto, 128),
    };
    w.value(&TType::Struct(index), value, "", 0)?;
    Ok(w.out.buf)
}

/// A struct of type `index` as JSON.
pub fn decode_struct(
    schema: &Schema,
    index: usize,
    bytes: &[u8],
    proto: Protocol,
) -> Result<Value, DecodeError> {
    let mut r = Reader {
        schema,
        r: In::new(proto, bytes),
    };
    r.value(&TType::Struct(index), 0)
}

/// A reply message to `method`, in the protocol its first byte shows (Binary strict or
/// old-style, or Compact).
pub fn decode_reply(
    schema: &Schema,
    method: &MethodDef,
    bytes: &[u8],
) -> Result<Reply, DecodeError> {
    let mut r = Reader {
        schema,
        r: In::new(Protocol::of_message(bytes), bytes),
    };
    match r.r.message()? {
        2 => r.result(method),
        3 => r.application(),
        other => Err(DecodeError(format!("message type {other} is not a reply"))),
    }
}

fn err<T>(path: &str, message: impl Into<String>) -> Result<T, JsonError> {
    Err(JsonError {
        path: if path.is_empty() {
            "(body)".into()
        } else {
            path.to_owned()
        },
        message: message.into(),
    })
}

/// What a JSON value is, for errors.
fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

struct Writer<'s> {
    schema: &'s Schema,
    out: Out,
}

impl Writer<'_> {
    /// The fields of a struct from object `v` (then the stop byte).
    fn fields(
        &mut self,
        fields: &[FieldDef],
        v: &Value,
        path: &str,
        kind: StructKind,
        depth: usize,
    ) -> Result<(), JsonError> {
        let Value::Object(o) = v else {
            return err(path, format!("expected an object, got {}", kind_of(v)));
        };
        if let Some(unknown) = o.keys().find(|k| fields.iter().all(|f| f.name != **k)) {
            let known: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
            return err(
                &join(path, unknown),
                format!("unknown field (fields: {})", known.join(", ")),
            );
        }
        let mut set = 0;
        let outer = self.out.struct_begin();
        for f in fields {
            let at = join(path, &f.name);
            match o.get(&f.name) {
                None | Some(Value::Null) if f.required == Requiredness::Required => {
                    return err(&at, "required field missing");
                }
                None | Some(Value::Null) => {}
                Some(Value::Bool(b)) if f.ty == TType::Bool => {
                    set += 1;
                    self.out.bool_field(f.id, *b);
                }
                Some(value) => {
                    set += 1;
                    self.out.field(wire_type(&f.ty), f.id);
                    self.value(&f.ty, value, &at, depth + 1)?;
                }
            }
        }
        if kind == StructKind::Union && set != 1 {
            return err(path, format!("a union takes exactly one field, got {set}"));
        }
        self.out.struct_end(outer);
        Ok(())
    }

    fn value(&mut self, t: &TType, v: &Value, path: &str, depth: usize) -> Result<(), JsonError> {
        if depth > MAX_DEPTH {
            return err(path, format!("nested deeper than {MAX_DEPTH}"));
        }
        let int = |lo: i64, hi: i64, what: &str| -> Result<i64, JsonError> {
            let n = match v {
                Value::Number(n) => n.as_i64(),
                _ => None,
            };
            match n {
                Some(n) if (lo..=hi).contains(&n) => Ok(n),
                _ => err(path, format!("expected {what}, got {v}")),
            }
        };
        match t {
            TType::Bool => match v {
                Value::Bool(b) => self.out.bool(*b),
                _ => return err(path, format!("expected a boolean, got {}", kind_of(v))),
            },
            TType::I8 => {
                let n = int(i8::MIN.into(), i8::MAX.into(), "an i8 (-128..127)")?;
                self.out.i8(n as i8);
            }
            TType::I16 => {
                let n = int(i16::MIN.into(), i16::MAX.into(), "an i16")?;
                self.out.i16(n as i16);
            }
            TType::I32 => {
                let n = int(i32::MIN.into(), i32::MAX.into(), "an i32")?;
                self.out.i32(n as i32);
            }
            TType::I64 => {
                let n = match v {
                    Value::Number(n) => n.as_i64(),
                    Value::String(s) => s.trim().parse().ok(),
                    _ => None,
                };
                let Some(n) = n else {
                    return err(
                        path,
                        format!("expected an i64 (a number or a string of digits), got {v}"),
                    );
                };
                self.out.i64(n);
            }
            TType::Double => match v.as_f64() {
                Some(x) => self.out.double(x),
                None => return err(path, format!("expected a number, got {}", kind_of(v))),
            },
            TType::String => match v {
                Value::String(s) => self.out.bytes(s.as_bytes()),
                _ => return err(path, format!("expected a string, got {}", kind_of(v))),
            },
            TType::Binary => match v.as_str().map(|s| B64.decode(s)) {
                Some(Ok(bytes)) => self.out.bytes(&bytes),
                _ => return err(path, "expected base64 (binary)"),
            },
            TType::Uuid => self.uuid(v, path)?,
            TType::Enum(i) => self.enumeration(*i, v, path)?,
            TType::List(e) | TType::Set(e) => {
                let Value::Array(items) = v else {
                    return err(path, format!("expected an array, got {}", kind_of(v)));
                };
                self.out.list(wire_type(e), items.len());
                for (n, item) in items.iter().enumerate() {
                    self.value(e, item, &format!("{path}[{n}]"), depth + 1)?;
                }
            }
            TType::Map(k, val) => self.map(k, val, v, path, depth)?,
            TType::Struct(i) => {
                let s = &self.schema.structs[*i];
                self.fields(&s.fields, v, path, s.kind, depth)?;
            }
        }
        Ok(())
    }

    fn enumeration(&mut self, i: usize, v: &Value, path: &str) -> Result<(), JsonError> {
        let e = &self.schema.enums[i];
        let n = match v {
            Value::String(name) => match e.values.iter().find(|(n, _)| n == name) {
                Some((_, n)) => *n,
                None => {
                    let names: Vec<&str> = e.values.iter().map(|(n, _)| n.as_str()).collect();
                    return err(
                        path,
                        format!("{name:?} is not a {} ({})", e.name, names.join(", ")),
                    );
                }
            },
            Value::Number(n) => match n.as_i64().and_then(|n| i32::try_from(n).ok()) {
                Some(n) => n,
                None => return err(path, format!("expected a {} value, got {n}", e.name)),
            },
            _ => return err(path, format!("expected a {} name or number", e.name)),
        };
        self.out.i32(n);
        Ok(())
    }

    fn uuid(&mut self, v: &Value, path: &str) -> Result<(), JsonError> {
        let hex: String = v
            .as_str()
            .unwrap_or_default()
            .chars()
            .filter(|c| *c != '-')
            .collect();
        let bytes: Option<[u8; 16]> = (hex.len() == 32)
            .then(|| {
                (0..16)
                    .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
                    .collect::<Option<Vec<u8>>>()
            })
            .flatten()
            .and_then(|b| b.try_into().ok());
        match bytes {
            Some(b) => self.out.uuid(&b),
            None => return err(path, "expected a UUID (8-4-4-4-12 hex digits)"),
        }
        Ok(())
    }

    fn map(
        &mut self,
        k: &TType,
        val: &TType,
        v: &Value,
        path: &str,
        depth: usize,
    ) -> Result<(), JsonError> {
        let (kt, vt) = (wire_type(k), wire_type(val));
        match (string_keyed(k), v) {
            (true, Value::Object(o)) => {
                self.out.map(kt, vt, o.len());
                for (key, item) in o {
                    let at = format!("{path}[{key:?}]");
                    self.value(k, &Value::String(key.clone()), &at, depth + 1)?;
                    self.value(val, item, &at, depth + 1)?;
                }
            }
            (false, Value::Array(pairs)) => {
                self.out.map(kt, vt, pairs.len());
                for (n, pair) in pairs.iter().enumerate() {
                    let at = format!("{path}[{n}]");
                    let Some([key, item]) = pair
                        .as_array()
                        .map(Vec::as_slice)
                        .and_then(|p| <&[Value; 2]>::try_from(p).ok())
                    else {
                        return err(&at, "expected a [key, value] pair");
                    };
                    self.value(k, key, &format!("{at}[0]"), depth + 1)?;
                    self.value(val, item, &format!("{at}[1]"), depth + 1)?;
                }
            }
            (true, _) => return err(path, format!("expected an object, got {}", kind_of(v))),
            (false, _) => {
                return err(
                    path,
                    format!(
                        "expected an array of [key, value] pairs, got {}",
                        kind_of(v)
                    ),
                )
            }
        }
        Ok(())
    }
}

/// Whether a map with keys of type `k` is a JSON object (string and enum keys).
fn string_keyed(k: &TType) -> bool {
    matches!(k, TType::String | TType::Enum(_))
}

fn join(path: &str, field: &str) -> String {
    match path.is_empty() {
        true => field.to_owned(),
        false => format!("{path}.{field}"),
    }
}

struct Reader<'s, 'b> {
    schema: &'s Schema,
    r: In<'b>,
}

impl Reader<'_, '_> {
    fn value(&mut self, t: &TType, depth: usize) -> Result<Value, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError(format!("nested deeper than {MAX_DEPTH}")));
        }
        Ok(match t {
            TType::Bool => Value::Bool(self.r.bool()?),
            TType::I8 => Value::from(self.r.i8()?),
            TType::I16 => Value::from(self.r.i16()?),
            TType::I32 => Value::from(self.r.i32()?),
            TType::I64 => Value::from(self.r.i64()?),
            TType::Double => Number::from_f64(self.r.double()?).map_or(Value::Null, Value::Number),
            TType::String => Value::String(String::from_utf8_lossy(self.r.bytes()?).into_owned()),
            TType::Binary => Value::String(B64.encode(self.r.bytes()?)),
            TType::Uuid => {
                let b = self.r.uuid()?;
                let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
                Value::String(format!(
                    "{}-{}-{}-{}-{}",
                    &hex[..8],
                    &hex[8..12],
                    &hex[12..16],
                    &hex[16..20],
                    &hex[20..]
                ))
            }
            TType::Enum(i) => {
                let n = self.r.i32()?;
                let e = &self.schema.enums[*i];
                match e.values.iter().find(|(_, v)| *v == n) {
                    Some((name, _)) => Value::String(name.clone()),
                    None => Value::from(n),
                }
            }
            TType::List(e) | TType::Set(e) => {
                let (_, n) = self.r.list()?;
                let mut items = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    items.push(self.value(e, depth + 1)?);
                }
                Value::Array(items)
            }
            TType::Map(k, v) => {
                let (_, _, n) = self.r.map()?;
                if string_keyed(k) {
                    let mut o = Map::new();
                    for _ in 0..n {
                        let key = match self.value(k, depth + 1)? {
                            Value::String(s) => s,
                            other => other.to_string(),
                        };
                        o.insert(key, self.value(v, depth + 1)?);
                    }
                    Value::Object(o)
                } else {
                    let mut pairs = Vec::with_capacity(n.min(1024));
                    for _ in 0..n {
                        let key = self.value(k, depth + 1)?;
                        pairs.push(Value::Array(vec![key, self.value(v, depth + 1)?]));
                    }
                    Value::Array(pairs)
                }
            }
            TType::Struct(i) => {
                let s = &self.schema.structs[*i];
                Value::Object(self.fields(&s.fields, depth)?)
            }
        })
    }

    /// A struct's fields by name; fields the IDL does not know are skipped.
    fn fields(
        &mut self,
        fields: &[FieldDef],
        depth: usize,
    ) -> Result<Map<String, Value>, DecodeError> {
        let mut o = Map::new();
        let outer = self.r.struct_begin();
        while let Some((wire, id)) = self.r.field()? {
            match fields
                .iter()
                .find(|f| f.id == id && wire_type(&f.ty) == wire)
            {
                Some(f) => {
                    let v = self.value(&f.ty, depth + 1)?;
                    o.insert(f.name.clone(), v);
                }
                None => self.skip(wire, depth + 1)?,
            }
        }
        self.r.struct_end(outer);
        Ok(o)
    }

    fn skip(&mut self, wire: u8, depth: usize) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError(format!("nested deeper than {MAX_DEPTH}")));
        }
        match wire {
            T_BOOL => drop(self.r.bool()?),
            T_BYTE => drop(self.r.i8()?),
            T_I16 => drop(self.r.i16()?),
            T_I32 => drop(self.r.i32()?),
            T_I64 => drop(self.r.i64()?),
            T_DOUBLE => drop(self.r.double()?),
            T_UUID => drop(self.r.uuid()?),
            T_STRING => drop(self.r.bytes()?),
            T_STRUCT => {
                let outer = self.r.struct_begin();
                while let Some((w, _)) = self.r.field()? {
                    self.skip(w, depth + 1)?;
                }
                self.r.struct_end(outer);
            }
            T_LIST | T_SET => {
                let (e, n) = self.r.list()?;
                for _ in 0..n {
                    self.skip(e, depth + 1)?;
                }
            }
            T_MAP => {
                let (k, v, n) = self.r.map()?;
                for _ in 0..n {
                    self.skip(k, depth + 1)?;
                    self.skip(v, depth + 1)?;
                }
            }
            other => return Err(DecodeError(format!("unknown field type {other}"))),
        }
        Ok(())
    }

    /// A REPLY's result struct: field 0 is the success, the others the declared exceptions.
    fn result(&mut self, method: &MethodDef) -> Result<Reply, DecodeError> {
        let mut fields = method.throws.clone();
        if let Some(t) = &method.result {
            fields.push(FieldDef {
                id: 0,
                name: "success".into(),
                required: Requiredness::Optional,
                ty: t.clone(),
            });
        }
        let mut o = self.fields(&fields, 0)?;
        if let Some(v) = o.remove("success") {
            return Ok(Reply::Success(v));
        }
        if let Some((field, value)) = o.into_iter().next() {
            return Ok(Reply::Declared { field, value });
        }
        match method.result {
            None => Ok(Reply::Success(Value::Null)),
            Some(_) => Err(DecodeError("the reply holds no result".into())),
        }
    }

    /// An EXCEPTION message: TApplicationException { 1: string message, 2: i32 type }.
    fn application(&mut self) -> Result<Reply, DecodeError> {
        let fields = [
            FieldDef {
                id: 1,
                name: "message".into(),
                required: Requiredness::Optional,
                ty: TType::String,
            },
            FieldDef {
                id: 2,
                name: "type".into(),
                required: Requiredness::Optional,
                ty: TType::I32,
            },
        ];
        let o = self.fields(&fields, 0)?;
        Ok(Reply::Application {
            kind: o.get("type").and_then(Value::as_i64).unwrap_or(0) as i32,
            message: o
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        })
    }
}
