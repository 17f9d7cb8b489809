//! JSON to Thrift and back, driven by a [`Schema`] at run time (written here: no crate encodes
//! Thrift from an IDL it reads while running). The mapping (docs/json.md): fields by their IDL
//! names; i64 as a number or a string of digits; binary as base64; enums by name or number (out:
//! by name when declared); lists and sets as arrays; maps with string (or enum) keys as objects,
//! others as arrays of `[key, value]`; required fields enforced, unknown fields refused. Binary
//! protocol, strict messages.

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use serde_json::{Map, Number, Value};

use crate::schema::{FieldDef, MethodDef, Requiredness, Schema, StructKind, TType};

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

const T_STOP: u8 = 0;
const T_BOOL: u8 = 2;
const T_BYTE: u8 = 3;
const T_DOUBLE: u8 = 4;
const T_I16: u8 = 6;
const T_I32: u8 = 8;
const T_I64: u8 = 10;
const T_STRING: u8 = 11;
const T_STRUCT: u8 = 12;
const T_MAP: u8 = 13;
const T_SET: u8 = 14;
const T_LIST: u8 = 15;
const T_UUID: u8 = 16;

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
) -> Result<Vec<u8>, JsonError> {
    let mut out = Vec::with_capacity(128);
    let kind: u32 = if method.oneway { 4 } else { 1 };
    out.extend_from_slice(&(0x8001_0000u32 | kind).to_be_bytes());
    put_str(&mut out, method.name.as_bytes());
    out.extend_from_slice(&seqid.to_be_bytes());
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
        let mut wrapped = Map::new();
        wrapped.insert(method.args[0].name.clone(), args.clone());
        w.fields(
            &method.args,
            &Value::Object(wrapped),
            "",
            StructKind::Struct,
            0,
        )?;
    } else {
        let empty = Value::Object(Map::new());
        let args = if args.is_null() { &empty } else { args };
        w.fields(&method.args, args, "", StructKind::Struct, 0)?;
    }
    Ok(w.out)
}

/// A struct of type `index` from JSON (what [`decode_struct`] gives back).
pub fn encode_struct(schema: &Schema, index: usize, value: &Value) -> Result<Vec<u8>, JsonError> {
    let mut w = Writer {
        schema,
        out: Vec::new(),
    };
    w.value(&TType::Struct(index), value, "", 0)?;
    Ok(w.out)
}

/// A struct of type `index` as JSON.
pub fn decode_struct(schema: &Schema, index: usize, bytes: &[u8]) -> Result<Value, DecodeError> {
    let mut r = Reader {
        schema,
        buf: bytes,
        at: 0,
    };
    r.value(&TType::Struct(index), 0)
}

/// A reply message to `method` (Binary protocol, strict or old-style).
pub fn decode_reply(
    schema: &Schema,
    method: &MethodDef,
    bytes: &[u8],
) -> Result<Reply, DecodeError> {
    let mut r = Reader {
        schema,
        buf: bytes,
        at: 0,
    };
    let first = r.i32()?;
    let kind = if first < 0 {
        let version = (first as u32) & 0xffff_0000;
        if version != 0x8001_0000 {
            return Err(DecodeError(format!("bad version {version:#x}")));
        }
        r.bytes()?;
        (first & 0xff) as u8
    } else {
        r.take(first as usize)?;
        r.u8()?
    };
    r.i32()?; // seqid
    match kind {
        2 => r.result(method),
        3 => r.application(),
        other => Err(DecodeError(format!("message type {other} is not a reply"))),
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as i32).to_be_bytes());
    out.extend_from_slice(s);
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
    out: Vec<u8>,
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
        for f in fields {
            let at = join(path, &f.name);
            match o.get(&f.name) {
                None | Some(Value::Null) if f.required == Requiredness::Required => {
                    return err(&at, "required field missing");
                }
                None | Some(Value::Null) => {}
                Some(value) => {
                    set += 1;
                    self.out.push(wire_type(&f.ty));
                    self.out.extend_from_slice(&f.id.to_be_bytes());
                    self.value(&f.ty, value, &at, depth + 1)?;
                }
            }
        }
        if kind == StructKind::Union && set != 1 {
            return err(path, format!("a union takes exactly one field, got {set}"));
        }
        self.out.push(T_STOP);
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
                Value::Bool(b) => self.out.push(u8::from(*b)),
                _ => return err(path, format!("expected a boolean, got {}", kind_of(v))),
            },
            TType::I8 => {
                let n = int(i8::MIN.into(), i8::MAX.into(), "an i8 (-128..127)")?;
                self.out.push(n as i8 as u8);
            }
            TType::I16 => {
                let n = int(i16::MIN.into(), i16::MAX.into(), "an i16")?;
                self.out.extend_from_slice(&(n as i16).to_be_bytes());
            }
            TType::I32 => {
                let n = int(i32::MIN.into(), i32::MAX.into(), "an i32")?;
                self.out.extend_from_slice(&(n as i32).to_be_bytes());
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
                self.out.extend_from_slice(&n.to_be_bytes());
            }
            TType::Double => match v.as_f64() {
                Some(x) => self.out.extend_from_slice(&x.to_bits().to_be_bytes()),
                None => return err(path, format!("expected a number, got {}", kind_of(v))),
            },
            TType::String => match v {
                Value::String(s) => put_str(&mut self.out, s.as_bytes()),
                _ => return err(path, format!("expected a string, got {}", kind_of(v))),
            },
            TType::Binary => match v.as_str().map(|s| B64.decode(s)) {
                Some(Ok(bytes)) => put_str(&mut self.out, &bytes),
                _ => return err(path, "expected base64 (binary)"),
            },
            TType::Uuid => self.uuid(v, path)?,
            TType::Enum(i) => self.enumeration(*i, v, path)?,
            TType::List(e) | TType::Set(e) => {
                let Value::Array(items) = v else {
                    return err(path, format!("expected an array, got {}", kind_of(v)));
                };
                self.out.push(wire_type(e));
                self.out
                    .extend_from_slice(&(items.len() as i32).to_be_bytes());
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
        self.out.extend_from_slice(&n.to_be_bytes());
        Ok(())
    }

    fn uuid(&mut self, v: &Value, path: &str) -> Result<(), JsonError> {
        let hex: String = v
            .as_str()
            .unwrap_or_default()
            .chars()
            .filter(|c| *c != '-')
            .collect();
        let bytes: Option<Vec<u8>> = (hex.len() == 32)
            .then(|| {
                (0..16)
                    .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
                    .collect()
            })
            .flatten();
        match bytes {
            Some(b) => self.out.extend_from_slice(&b),
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
        self.out.push(wire_type(k));
        self.out.push(wire_type(val));
        match (string_keyed(k), v) {
            (true, Value::Object(o)) => {
                self.out.extend_from_slice(&(o.len() as i32).to_be_bytes());
                for (key, item) in o {
                    let at = format!("{path}[{key:?}]");
                    self.value(k, &Value::String(key.clone()), &at, depth + 1)?;
                    self.value(val, item, &at, depth + 1)?;
                }
            }
            (false, Value::Array(pairs)) => {
                self.out
                    .extend_from_slice(&(pairs.len() as i32).to_be_bytes());
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
    buf: &'b [u8],
    at: usize,
}

impl Reader<'_, '_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| DecodeError(format!("ends early at byte {}", self.at)))?;
        let bytes = &self.buf[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }

    fn len(&mut self) -> Result<usize, DecodeError> {
        let n = self.i32()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.buf.len() - self.at)
            .ok_or_else(|| DecodeError(format!("bad length {n}")))
    }

    fn bytes(&mut self) -> Result<&[u8], DecodeError> {
        let n = self.len()?;
        self.take(n)
    }

    fn value(&mut self, t: &TType, depth: usize) -> Result<Value, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError(format!("nested deeper than {MAX_DEPTH}")));
        }
        Ok(match t {
            TType::Bool => Value::Bool(self.u8()? != 0),
            TType::I8 => Value::from(self.u8()? as i8),
            TType::I16 => Value::from(self.i16()?),
            TType::I32 => Value::from(self.i32()?),
            TType::I64 => Value::from(self.i64()?),
            TType::Double => {
                let x = f64::from_bits(self.i64()? as u64);
                Number::from_f64(x).map_or(Value::Null, Value::Number)
            }
            TType::String => Value::String(String::from_utf8_lossy(self.bytes()?).into_owned()),
            TType::Binary => Value::String(B64.encode(self.bytes()?)),
            TType::Uuid => {
                let b = self.take(16)?;
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
                let n = self.i32()?;
                let e = &self.schema.enums[*i];
                match e.values.iter().find(|(_, v)| *v == n) {
                    Some((name, _)) => Value::String(name.clone()),
                    None => Value::from(n),
                }
            }
            TType::List(e) | TType::Set(e) => {
                self.u8()?;
                let n = self.len()?;
                let mut items = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    items.push(self.value(e, depth + 1)?);
                }
                Value::Array(items)
            }
            TType::Map(k, v) => {
                self.take(2)?;
                let n = self.len()?;
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
        loop {
            let wire = self.u8()?;
            if wire == T_STOP {
                return Ok(o);
            }
            let id = self.i16()?;
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
    }

    fn skip(&mut self, wire: u8, depth: usize) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError(format!("nested deeper than {MAX_DEPTH}")));
        }
        match wire {
            T_BOOL | T_BYTE => drop(self.take(1)?),
            T_I16 => drop(self.take(2)?),
            T_I32 => drop(self.take(4)?),
            T_I64 | T_DOUBLE => drop(self.take(8)?),
            T_UUID => drop(self.take(16)?),
            T_STRING => drop(self.bytes()?),
            T_STRUCT => loop {
                let w = self.u8()?;
                if w == T_STOP {
                    break;
                }
                self.take(2)?;
                self.skip(w, depth + 1)?;
            },
            T_LIST | T_SET => {
                let e = self.u8()?;
                let n = self.len()?;
                for _ in 0..n {
                    self.skip(e, depth + 1)?;
                }
            }
            T_MAP => {
                let (k, v) = (self.u8()?, self.u8()?);
                let n = self.len()?;
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
