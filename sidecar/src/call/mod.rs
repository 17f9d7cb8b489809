//! `fnmesh call` (one real binary call built from a function's IDL, its reply as JSON) and
//! `fnmesh idl` (the services, methods and types a function serves). Blocking std I/O: one
//! call needs no runtime.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

use bytes::BytesMut;
use fnmesh_codec::{FrameDecoder, Limits};
use fnmesh_idl::{
    schema::{FieldDef, Requiredness, Schema, StructKind, TType},
    thrift_json::{self, Reply},
};
use serde_json::Value;

mod grpc;

use crate::config::{Config, FunctionConfig, Protocol};

/// Exit status of `fnmesh call` for each way a call can end (docs/gateway.md lists them).
fn exit_for(kind: &str) -> u8 {
    match kind {
        "no-route" => 10,
        "bad-request" => 11,
        "too-large" => 12,
        "overloaded" => 13,
        "circuit-open" => 14,
        "unavailable" | "not-warm" => 15,
        "timeout" => 16,
        "exception" => 20,
        "application-exception" => 21,
        _ => 1,
    }
}

pub(super) fn fail(kind: &str, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("fnmesh: {kind}: {message}");
    ExitCode::from(exit_for(kind))
}

/// Where `fnmesh call` sends a call, and the IDL it builds it from.
pub struct Target {
    pub addr: SocketAddr,
    pub schema: std::sync::Arc<Schema>,
    /// The IDL service (`isn`; gRPC: `package.Service`).
    pub service: String,
    /// A gRPC function's descriptors: the call goes over HTTP/2 instead.
    pub proto: Option<std::sync::Arc<fnmesh_idl::proto_json::ProtoSchema>>,
    /// The Thrift protocol the call is written in.
    pub thrift_protocol: thrift_json::Protocol,
}

impl Target {
    /// `function` as the policy file configures it, at `addr` or else the file's `listen`.
    pub fn of_function(
        config: &Config,
        function: &str,
        addr: Option<SocketAddr>,
    ) -> Result<Target, ExitCode> {
        let Some(f) = config.functions.iter().find(|f| f.name == function) else {
            return Err(fail(
                "no-route",
                format!("the file configures no function {function}"),
            ));
        };
        let mut listen = config.sidecar.listen;
        if listen.ip().is_unspecified() {
            listen.set_ip([127, 0, 0, 1].into());
        }
        let addr = addr.unwrap_or(listen);
        match (f.protocol, &f.schema, &f.proto, &f.service) {
            (Protocol::Thrift, Some(schema), _, Some(service)) => Ok(Target {
                addr,
                schema: schema.clone(),
                service: service.clone(),
                proto: None,
                thrift_protocol: f.thrift_protocol,
            }),
            (Protocol::Grpc, _, Some(proto), Some(service)) => Ok(Target {
                addr,
                schema: std::sync::Arc::new(Schema::default()),
                service: service.clone(),
                proto: Some(proto.clone()),
                thrift_protocol: thrift_json::Protocol::Binary,
            }),
            _ => Err(fail(
                "bad-request",
                format!("function {function}: calls need an IDL (`idl` in its table)"),
            )),
        }
    }

    /// Any Thrift server at `addr` (a sidecar, or a Kitex or Volo server), from its `.thrift`
    /// IDL and the service named (else the IDL's only one).
    pub fn of_idl(
        addr: SocketAddr,
        idl: &std::path::Path,
        service: Option<&str>,
    ) -> Result<Target, ExitCode> {
        let loaded = fnmesh_idl::Catalog::load(idl, &[]).and_then(|c| {
            let service = c.select(service)?.name.clone();
            Ok((fnmesh_idl::Catalog::thrift_schema(idl, &[])?, service))
        });
        match loaded {
            Ok((schema, service)) => Ok(Target {
                addr,
                schema: std::sync::Arc::new(schema),
                service,
                proto: None,
                thrift_protocol: thrift_json::Protocol::Binary,
            }),
            Err(e) => Err(fail("bad-request", e)),
        }
    }
}

/// `fnmesh call`: `function`'s `method` with `args` (JSON; `-` reads stdin) at the target.
pub fn main(
    target: &Target,
    timeout: Duration,
    function: &str,
    method: &str,
    args: Option<&str>,
) -> ExitCode {
    let (schema, service) = (&*target.schema, &target.service);
    if let Some(proto) = &target.proto {
        return match read_args(args) {
            Ok(args) => grpc::call(target.addr, proto, service, method, timeout, &args),
            Err(code) => code,
        };
    }
    let Some(m) = schema.service(service).and_then(|s| s.method(method)) else {
        return fail(
            "no-route",
            format!("function {function} has no method {method}"),
        );
    };
    let args = match read_args(args) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let message = match thrift_json::encode_call(schema, m, &args, 1, target.thrift_protocol) {
        Ok(m) => m,
        Err(e) => return fail("bad-request", e),
    };
    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let frame = match fnmesh_codec::wrap_call(1, function, service, Some(ms), &[], &message) {
        Ok(f) => f,
        Err(e) => return fail("bad-request", e),
    };
    let addr = target.addr;
    if m.oneway {
        return match send(addr, &frame, timeout, false) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => fail("unavailable", format!("{addr}: {e}")),
        };
    }
    match send(addr, &frame, timeout, true) {
        Ok(reply) => print_reply(schema, m, &reply),
        Err(e) => fail("unavailable", format!("{addr}: {e}")),
    }
}

/// `fnmesh call --async`: the call queued through the sidecar's `POST /async/...`; prints
/// `{"id": ..., "state": "queued"}`, or exits by the error kind.
pub fn enqueue(
    addr: SocketAddr,
    timeout: Duration,
    function: &str,
    method: &str,
    args: Option<&str>,
) -> ExitCode {
    let body = match read_args(args) {
        Ok(v) => v.to_string(),
        Err(code) => return code,
    };
    let request = format!(
        "POST /async/{function}/{method} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n{}: {}ms\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        crate::thrift::http::TIMEOUT_HEADER,
        timeout.as_millis().max(1),
        body.len()
    );
    let answer = (|| -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })();
    let answer = match answer {
        Ok(a) => a,
        Err(e) => return fail("unavailable", format!("{addr}: {e}")),
    };
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("");
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    match (status, v["error"].as_str()) {
        ("202", _) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        (_, Some(kind)) => fail(kind, v["message"].as_str().unwrap_or_default()),
        _ => fail("unavailable", format!("{addr} answered {status}: {body}")),
    }
}

/// The call's arguments: `args` (`-`: stdin; none: `{}`) as JSON.
fn read_args(args: Option<&str>) -> Result<Value, ExitCode> {
    let text = match args {
        Some("-") => {
            let mut s = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut s) {
                return Err(fail("bad-request", format!("cannot read stdin: {e}")));
            }
            s
        }
        Some(text) => text.to_owned(),
        None => "{}".to_owned(),
    };
    serde_json::from_str(&text).map_err(|e| fail("bad-request", format!("malformed JSON: {e}")))
}

/// Writes `frame` to `addr` and reads one reply frame (when `reply`).
fn send(
    addr: SocketAddr,
    frame: &[u8],
    timeout: Duration,
    reply: bool,
) -> std::io::Result<BytesMut> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout + Duration::from_secs(1)))?;
    s.write_all(frame)?;
    let mut buf = BytesMut::new();
    if !reply {
        return Ok(buf);
    }
    let mut decoder = FrameDecoder::new(Limits::default());
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut probe = buf.clone();
        if decoder.split(&mut probe).ok().flatten().is_some() {
            return Ok(buf);
        }
    }
}

/// Prints the reply as JSON (exit 0), or the error fnmesh or the function answered (its exit
/// status).
fn print_reply(schema: &Schema, m: &fnmesh_idl::schema::MethodDef, reply: &[u8]) -> ExitCode {
    let mut buf = BytesMut::from(reply);
    let Ok(Some(frame)) = FrameDecoder::new(Limits::default()).decode(&mut buf) else {
        return fail("unavailable", "the reply does not decode");
    };
    let error_kind = frame.ttheader().and_then(|h| {
        h.str_kvs(frame.head())
            .find(|(k, _)| *k == fnmesh_codec::FNMESH_ERROR_KEY.as_bytes())
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    });
    let mut message = frame.head()[frame.message().start..].to_vec();
    message.extend_from_slice(frame.payload());
    match thrift_json::decode_reply(schema, m, &message) {
        Ok(Reply::Success(v)) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(Reply::Declared { field, value }) => {
            println!(
                "{}",
                serde_json::json!({ "exception": field, "value": value })
            );
            ExitCode::from(exit_for("exception"))
        }
        Ok(Reply::Application { kind, message }) => match error_kind {
            Some(k) => fail(&k, message),
            None => fail("application-exception", format!("type {kind}: {message}")),
        },
        Err(e) => fail("unavailable", e),
    }
}

/// `fnmesh idl`: each function's (or one's) IDL service, methods with their signatures, and
/// the types they use.
pub fn idl(config: &Config, function: Option<&str>) -> ExitCode {
    let chosen: Vec<&FunctionConfig> = config
        .functions
        .iter()
        .filter(|f| function.is_none_or(|n| f.name == n))
        .collect();
    if chosen.is_empty() {
        return fail(
            "no-route",
            format!("no function {}", function.unwrap_or("")),
        );
    }
    for f in chosen {
        let protocol = match f.protocol {
            Protocol::Thrift => "thrift",
            Protocol::Grpc => "grpc",
        };
        let service = f.service.as_deref().unwrap_or("(no IDL)");
        println!("function {} ({protocol}): service {service}", f.name);
        match (&f.schema, &f.service) {
            (Some(schema), Some(service)) => print_thrift(schema, service),
            _ => {
                for m in f.methods.iter().flatten() {
                    let stream = |s: bool| if s { "stream " } else { "" };
                    println!(
                        "  rpc {}({}) returns ({})",
                        m.name,
                        stream(m.client_streaming),
                        stream(m.server_streaming)
                    );
                }
            }
        }
    }
    ExitCode::SUCCESS
}

fn print_thrift(schema: &Schema, service: &str) {
    let Some(s) = schema.service(service) else {
        return;
    };
    for m in &s.methods {
        let result = m
            .result
            .as_ref()
            .map_or("void".into(), |t| type_name(schema, t));
        let oneway = if m.oneway { "oneway " } else { "" };
        let throws = match m.throws.is_empty() {
            true => String::new(),
            false => format!(" throws ({})", fields(schema, &m.throws)),
        };
        println!(
            "  {oneway}{result} {}({}){throws}",
            m.name,
            fields(schema, &m.args)
        );
    }
    for st in &schema.structs {
        let kind = match st.kind {
            StructKind::Struct => "struct",
            StructKind::Union => "union",
            StructKind::Exception => "exception",
        };
        println!("  {kind} {} {{ {} }}", st.name, fields(schema, &st.fields));
    }
    for e in &schema.enums {
        let values: Vec<String> = e.values.iter().map(|(n, v)| format!("{n} = {v}")).collect();
        println!("  enum {} {{ {} }}", e.name, values.join(", "));
    }
}

fn fields(schema: &Schema, fields: &[FieldDef]) -> String {
    let list: Vec<String> = fields
        .iter()
        .map(|f| {
            let req = match f.required {
                Requiredness::Required => "required ",
                Requiredness::Optional => "optional ",
                Requiredness::Default => "",
            };
            format!("{}: {req}{} {}", f.id, type_name(schema, &f.ty), f.name)
        })
        .collect();
    list.join(", ")
}

fn type_name(schema: &Schema, t: &TType) -> String {
    match t {
        TType::Bool => "bool".into(),
        TType::I8 => "byte".into(),
        TType::I16 => "i16".into(),
        TType::I32 => "i32".into(),
        TType::I64 => "i64".into(),
        TType::Double => "double".into(),
        TType::String => "string".into(),
        TType::Binary => "binary".into(),
        TType::Uuid => "uuid".into(),
        TType::List(e) => format!("list<{}>", type_name(schema, e)),
        TType::Set(e) => format!("set<{}>", type_name(schema, e)),
        TType::Map(k, v) => format!("map<{}, {}>", type_name(schema, k), type_name(schema, v)),
        TType::Struct(i) => schema.structs[*i].name.clone(),
        TType::Enum(i) => schema.enums[*i].name.clone(),
    }
}
