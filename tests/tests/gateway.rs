//! The HTTP/JSON gateway end to end: HTTP/1.1 requests on the main listener become Thrift calls
//! of a real Volo function (from zero instances), built from its IDL; errors get their statuses
//! and never reach the instance.
#![forbid(unsafe_code)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use fnmesh_tests::sidecar::{echo_function, Sidecar};
use serde_json::{json, Value};

/// One response read off `s`: status and JSON body (by content-length).
fn read_response(s: &mut TcpStream) -> (u16, Value) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).unwrap(),
            1,
            "response ended early: {head:?}"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status: u16 = head[9..12].parse().unwrap();
    let len = fnmesh_tests::registries::content_length(&head);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, body)
}

fn request(method: &str, path: &str, headers: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nhost: fnmesh\r\ncontent-type: application/json\r\n{headers}content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn post(addr: SocketAddr, path: &str, headers: &str, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request("POST", path, headers, body).as_bytes())
        .unwrap();
    read_response(&mut s)
}

#[test]
fn json_calls_reach_a_volo_function_from_zero_and_errors_get_their_statuses() {
    let sc = Sidecar::start(&echo_function("echo", "idle = \"30s\"", ""));
    // Refused without starting anything: each names what is wrong.
    let refused = [
        ("/nope/Echo", r#"{"message": "x"}"#, 404, "no function nope"),
        (
            "/echo/Nope",
            r#"{"message": "x"}"#,
            404,
            "has no method Nope",
        ),
        ("/echo/Echo", r#"{"message": "#, 400, "malformed JSON"),
        (
            "/echo/Echo",
            r#"{"message": 5}"#,
            400,
            "req.message: expected a string",
        ),
        (
            "/echo/Echo",
            r#"{"sleep_ms": 5}"#,
            400,
            "req.message: required field missing",
        ),
        (
            "/echo/Echo",
            r#"{"message": "x", "bogus": 1}"#,
            400,
            "req.bogus: unknown field",
        ),
    ];
    for (path, body, status, needle) in refused {
        let (got, v) = post(sc.addr, path, "", body);
        assert_eq!(got, status, "{path} {body}: {v}");
        let kind = if status == 404 {
            "no-route"
        } else {
            "bad-request"
        };
        assert_eq!(v["error"], kind, "{v}");
        assert!(v["message"].as_str().unwrap().contains(needle), "{v}");
    }
    assert_eq!(
        sc.stat("echo", "processes"),
        0,
        "no refused call started an instance"
    );
    // From zero: the struct as the body, or the argument by name.
    let (status, v) = post(sc.addr, "/echo/Echo", "", r#"{"message": "hi"}"#);
    assert_eq!(
        (status, v),
        (200, json!({"message": "hi", "instance": "1"}))
    );
    let (status, v) = post(
        sc.addr,
        "/echo/Echo",
        "",
        r#"{"req": {"message": "by name"}}"#,
    );
    assert_eq!((status, &v["message"]), (200, &json!("by name")));
    // A declared exception, and a TApplicationException.
    let (status, v) = post(sc.addr, "/echo/Echo", "", r#"{"message": "__business__"}"#);
    assert_eq!(status, 422, "{v}");
    assert_eq!(
        v,
        json!({"exception": "err", "value": {"code": 42, "reason": "declared business error"}})
    );
    let (status, v) = post(sc.addr, "/echo/Echo", "", r#"{"message": "__fail__"}"#);
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"], "application-exception");
    assert_eq!(v["type"], 6);
    // The deadline header: the function sleeps past it.
    let (status, v) = post(
        sc.addr,
        "/echo/Echo",
        "fnmesh-timeout: 100ms\r\n",
        r#"{"message": "slow", "sleep_ms": 2000}"#,
    );
    assert_eq!((status, &v["error"]), (504, &json!("timeout")), "{v}");
    // The instance sees it as its RPC timeout.
    let (_, v) = post(
        sc.addr,
        "/echo/Echo",
        "fnmesh-timeout: 1500ms\r\n",
        r#"{"message": "__timeout__"}"#,
    );
    let seen: u64 = v["message"].as_str().unwrap().parse().unwrap();
    assert!(seen > 1000 && seen <= 1500, "{v}");
    // Oneway: accepted.
    let (status, v) = post(sc.addr, "/echo/Ping", "", r#"{"note": "n"}"#);
    assert_eq!((status, v), (202, json!({})));
    // Not POST.
    let mut s = TcpStream::connect(sc.addr).unwrap();
    s.write_all(request("GET", "/echo/Echo", "", "").as_bytes())
        .unwrap();
    assert_eq!(read_response(&mut s).0, 400);
}

/// Governance through the gateway: a rate limit's `overloaded` is 429, an open breaker's
/// `circuit-open` and a function that cannot start's `unavailable` are 503, each with the kind.
#[test]
fn overloaded_circuit_open_and_unavailable_get_429_and_503() {
    let broken = format!(
        "[[function]]\nname = \"broken\"\nprotocol = \"thrift\"\nidl = \"{}\"\ncommand = [\"/bin/false\"]\n\n[function.scale]\nstartup_timeout = \"1s\"\n\n",
        fnmesh_tests::sidecar::idl("thrift/echo.thrift").display()
    );
    let raw = "[[function]]\nname = \"raw\"\nprotocol = \"thrift\"\ncommand = [\"/bin/false\"]\n\n";
    let sc = Sidecar::start(&format!(
        "{}{}{broken}{raw}",
        echo_function("limited", "", "rate_limit = { rps = 1, burst = 1 }"),
        echo_function(
            "fragile",
            "min = 1\nmax = 1",
            "circuit_breaker = { window = \"10s\", min_requests = 4, failure_ratio = 0.5, open = \"30s\" }",
        ),
    ));
    let body = r#"{"message": "hi"}"#;
    assert_eq!(post(sc.addr, "/limited/Echo", "", body).0, 200);
    let (status, v) = post(sc.addr, "/limited/Echo", "", body);
    assert_eq!((status, &v["error"]), (429, &json!("overloaded")), "{v}");
    // Failures open the breaker (its task looks every 250 ms).
    let fail = r#"{"message": "__fail__"}"#;
    for _ in 0..6 {
        assert_eq!(post(sc.addr, "/fragile/Echo", "", fail).0, 502);
    }
    std::thread::sleep(Duration::from_millis(600));
    let (status, v) = post(sc.addr, "/fragile/Echo", "", body);
    assert_eq!((status, &v["error"]), (503, &json!("circuit-open")), "{v}");
    // A function whose instances exit at once.
    let (status, v) = post(sc.addr, "/broken/Echo", "", body);
    assert_eq!((status, &v["error"]), (503, &json!("unavailable")), "{v}");
    // No IDL: the gateway cannot build the call, so a function without one is no-route.
    let (status, v) = post(sc.addr, "/raw/Echo", "", body);
    assert_eq!((status, &v["error"]), (404, &json!("no-route")), "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("no Thrift IDL"),
        "{v}"
    );
}

#[test]
fn keep_alive_and_pipelined_requests_are_answered_in_order() {
    let sc = Sidecar::start(&echo_function("echo", "", ""));
    let mut s = TcpStream::connect(sc.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for i in 0..3 {
        let body = format!(r#"{{"message": "k{i}"}}"#);
        s.write_all(request("POST", "/echo/Echo", "", &body).as_bytes())
            .unwrap();
        let (status, v) = read_response(&mut s);
        assert_eq!((status, &v["message"]), (200, &json!(format!("k{i}"))));
    }
    let mut pipelined = String::new();
    for i in 0..5 {
        let body = format!(r#"{{"message": "p{i}", "sleep_ms": {}}}"#, 50 - 10 * i);
        pipelined.push_str(&request("POST", "/echo/Echo", "", &body));
    }
    s.write_all(pipelined.as_bytes()).unwrap();
    for i in 0..5 {
        let (status, v) = read_response(&mut s);
        assert_eq!((status, &v["message"]), (200, &json!(format!("p{i}"))));
    }
}

#[test]
fn a_body_over_max_frame_size_is_413() {
    let sc = Sidecar::start_with("max_frame_size = \"1KiB\"", &echo_function("echo", "", ""));
    let big = format!(r#"{{"message": "{}"}}"#, "x".repeat(2000));
    let (status, v) = post(sc.addr, "/echo/Echo", "", &big);
    assert_eq!((status, &v["error"]), (413, &json!("too-large")), "{v}");
    let (status, _) = post(sc.addr, "/echo/Echo", "", r#"{"message": "small"}"#);
    assert_eq!(status, 200);
}

/// `fnmesh call` with the sidecar's policy file: (exit status, stdout, stderr).
fn fnmesh_call(sc: &Sidecar, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(fnmesh_tests::sidecar::fnmesh_bin())
        .arg(args[0])
        .arg("-c")
        .arg(sc.config_path())
        .args(&args[1..])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn fnmesh_call_and_fnmesh_idl_speak_the_idl() {
    let sc = Sidecar::start(&echo_function("echo", "", ""));
    let (code, out, err) = fnmesh_call(&sc, &["call", "echo", "Echo", r#"{"message": "hi"}"#]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v, json!({"message": "hi", "instance": "1"}));
    let (code, out, _) = fnmesh_call(
        &sc,
        &["call", "echo", "Echo", r#"{"message": "__business__"}"#],
    );
    assert_eq!(code, 20);
    assert!(out.contains(r#""exception":"err""#), "{out}");
    let (code, _, err) = fnmesh_call(&sc, &["call", "echo", "Nope", "{}"]);
    assert_eq!(
        (code, err.trim()),
        (10, "fnmesh: no-route: function echo has no method Nope")
    );
    let (code, _, err) = fnmesh_call(&sc, &["call", "echo", "Echo", r#"{"message": 1}"#]);
    assert_eq!(code, 11, "{err}");
    assert!(err.contains("req.message: expected a string"), "{err}");
    let slow = r#"{"message": "slow", "sleep_ms": 3000}"#;
    let (code, _, err) = fnmesh_call(&sc, &["call", "--timeout", "200ms", "echo", "Echo", slow]);
    assert_eq!(code, 16, "{err}");
    assert!(err.starts_with("fnmesh: timeout: "), "{err}");
    // Without a policy file: any Thrift server, from its IDL (here a plain Volo server).
    let (_plain, plain) = fnmesh_tests::bench::start_function(&fnmesh_tests::sidecar::echo_fn());
    let idl = fnmesh_tests::sidecar::idl("thrift/echo.thrift");
    let out = std::process::Command::new(fnmesh_tests::sidecar::fnmesh_bin())
        .args(["call", "--addr", &plain.to_string(), "--idl"])
        .arg(&idl)
        .args(["echo", "Echo", r#"{"message": "straight to Volo"}"#])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["message"], "straight to Volo");
    let (code, out, _) = fnmesh_call(&sc, &["idl"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("function echo (thrift): service EchoService"),
        "{out}"
    );
    assert!(
        out.contains(
            "EchoResponse Echo(1: required EchoRequest req) throws (1: FunctionError err)"
        ),
        "{out}"
    );
    assert!(
        out.contains("oneway void Ping(1: required string note)"),
        "{out}"
    );
    assert!(out.contains("struct EchoRequest { 1: required string message, 2: optional i64 sleep_ms, 3: optional Meta meta }"), "{out}");
}

/// A function with `thrift_protocol = "compact"` gets JSON calls (the gateway's, `fnmesh
/// call`'s) in Compact: types-fn adds 1,000,000 to `Two` when Volo decoded Compact.
#[test]
fn thrift_protocol_compact_sends_json_calls_in_compact() {
    let types = |name: &str, extra: &str| {
        format!(
            "[[function]]\nname = \"{name}\"\nprotocol = \"thrift\"\nidl = \"{}\"\nservice = \"Types\"\n{extra}command = [\"{}\"]\n\n",
            fnmesh_tests::sidecar::idl("tests/thrift/types.thrift").display(),
            fnmesh_tests::sidecar::bin("types-fn")
        )
    };
    let config = types("compact", "thrift_protocol = \"compact\"\n") + &types("binary", "");
    let sc = Sidecar::start(&config);
    let two = r#"{"a": 40, "b": "xy"}"#;
    assert_eq!(
        post(sc.addr, "/compact/Two", "", two),
        (200, json!(1_000_042))
    );
    assert_eq!(post(sc.addr, "/binary/Two", "", two), (200, json!(42)));
    let (code, out, err) = fnmesh_call(&sc, &["call", "compact", "Two", two]);
    assert_eq!((code, out.trim()), (0, "1000042"), "{err}");
    let (code, out, err) = fnmesh_call(
        &sc,
        &["call", "--protocol", "binary", "compact", "Two", two],
    );
    assert_eq!((code, out.trim()), (0, "42"), "{err}");
    let (code, out, err) = fnmesh_call(
        &sc,
        &["call", "--protocol", "compact", "binary", "Two", two],
    );
    assert_eq!((code, out.trim()), (0, "1000042"), "{err}");
}

/// `/admin/idl` lists every function's service and methods; `/admin/openapi.json` describes
/// the gateway's routes with schemas from the IDL, and validates as OpenAPI 3
/// (`openapi-spec-validator`, from PyPI).
#[test]
fn the_catalog_and_an_openapi_document_that_validates() {
    let sc = Sidecar::start(&format!(
        "{}{}",
        echo_function("echo", "", ""),
        fnmesh_tests::sidecar::grpc_echo_function("gecho", "", "")
    ));
    let (_, body) = sc.admin_get("/admin/idl");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["functions"][0]["service"], "EchoService");
    assert_eq!(
        v["functions"][0]["methods"][1],
        json!({"name": "Ping", "oneway": true, "client_streaming": false, "server_streaming": false})
    );
    assert_eq!(v["functions"][1]["service"], "echo.Echo");
    assert_eq!(v["functions"][1]["methods"][3]["client_streaming"], true);
    let (_, doc) = sc.admin_get("/admin/openapi.json");
    let v: Value = serde_json::from_str(&doc).unwrap();
    let echo = &v["paths"]["/echo/Echo"]["post"];
    assert_eq!(
        echo["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/echo.EchoResponse"
    );
    assert_eq!(
        v["components"]["schemas"]["echo.EchoRequest"]["required"],
        json!(["message"])
    );
    assert!(v["paths"]["/echo/Ping"]["post"]["responses"]["202"].is_object());
    // gRPC functions: their unary methods, with proto3 JSON schemas.
    assert_eq!(
        v["paths"]["/gecho/UnaryEcho"]["post"]["requestBody"]["content"]["application/json"]
            ["schema"]["$ref"],
        "#/components/schemas/gecho.echo.EchoRequest"
    );
    assert!(
        v["components"]["schemas"]["gecho.echo.EchoRequest"]["properties"]["sleepMs"].is_object()
    );
    assert!(v["paths"].get("/gecho/ServerStreamingEcho").is_none());
    let file = std::env::temp_dir().join(format!("fnmesh-openapi-{}.json", std::process::id()));
    std::fs::write(&file, &doc).unwrap();
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys; from openapi_spec_validator import validate; validate(json.load(open(sys.argv[1]))); print('valid')",
        ])
        .arg(&file)
        .output()
        .expect("python3 runs");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Hostile HTTP/1.1 peers: headers that never end are cut off at `header_timeout`, a request
/// line that is not HTTP, and a header section past hyper's limits get an error and the
/// connection closes; callers on other connections are served throughout.
#[test]
fn hostile_http_peers_hurt_no_one_else() {
    let sc = Sidecar::start_with("header_timeout = \"1s\"", &echo_function("echo", "", ""));
    let read_all = |s: &mut TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    // Headers that never end.
    let mut slow = TcpStream::connect(sc.addr).unwrap();
    slow.write_all(b"POST /echo/Echo HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    let t = std::time::Instant::now();
    let out = read_all(&mut slow);
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "closed after {took:?}: {out}"
    );
    // Not HTTP after a method.
    let mut junk = TcpStream::connect(sc.addr).unwrap();
    junk.write_all(b"GET \x00\x01\x02 nonsense\r\n\r\n")
        .unwrap();
    let out = read_all(&mut junk);
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 400"), "{out}");
    // A header section of 1 MiB.
    let mut huge = TcpStream::connect(sc.addr).unwrap();
    let header = format!(
        "POST /echo/Echo HTTP/1.1\r\nx-big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let _ = huge.write_all(header.as_bytes());
    let out = read_all(&mut huge);
    assert!(
        out.is_empty() || out.starts_with("HTTP/1.1 431") || out.starts_with("HTTP/1.1 400"),
        "{}",
        &out[..out.len().min(200)]
    );
    // A keep-alive connection left idle: closed once `header_timeout` passes with no request.
    let mut idle = TcpStream::connect(sc.addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    idle.write_all(request("POST", "/echo/Echo", "", r#"{"message": "once"}"#).as_bytes())
        .unwrap();
    assert_eq!(read_response(&mut idle).0, 200);
    let t = std::time::Instant::now();
    let out = read_all(&mut idle);
    assert!(
        out.is_empty() && t.elapsed() < Duration::from_secs(4),
        "{out} after {:?}",
        t.elapsed()
    );
    // Meanwhile and after: served.
    let (status, v) = post(sc.addr, "/echo/Echo", "", r#"{"message": "fine"}"#);
    assert_eq!((status, &v["message"]), (200, &json!("fine")));
}

/// An ordinary HTTP client (Python's `urllib`) calls the function from zero instances, and
/// reads fnmesh's errors as HTTP statuses.
#[test]
fn python_urllib_calls_a_function_from_zero() {
    let sc = Sidecar::start(&echo_function("echo", "", ""));
    let script = r#"
import json, sys, urllib.request, urllib.error
base = sys.argv[1]
def post(path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)
print(json.dumps([post("/echo/Echo", {"message": "from python"}), post("/echo/Echo", {"message": 1}), post("/nope/Echo", {})]))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &format!("http://{}", sc.addr)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v[0],
        json!([200, {"message": "from python", "instance": "1"}])
    );
    assert_eq!(v[1][0], 400);
    assert_eq!(v[1][1]["error"], "bad-request");
    assert_eq!(v[2][0], 404);
}

/// `fnmesh call` for a gRPC function: the request from the `.proto` (proto3 JSON), a unary
/// call over HTTP/2 through the sidecar, the response as JSON; gRPC errors by their kind.
#[test]
fn fnmesh_call_speaks_grpc_from_the_proto() {
    let sc = Sidecar::start(&fnmesh_tests::sidecar::grpc_echo_function("gecho", "", ""));
    let (code, out, err) = fnmesh_call(
        &sc,
        &[
            "call",
            "gecho",
            "UnaryEcho",
            r#"{"message": "hi", "sleepMs": "1"}"#,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v, json!({"message": "hi", "instance": "1"}));
    let (code, _, err) = fnmesh_call(&sc, &["call", "gecho", "UnaryEcho", r#"{"bogus": 1}"#]);
    assert_eq!(code, 11, "{err}");
    assert!(err.contains("bogus"), "{err}");
    let (code, _, err) = fnmesh_call(
        &sc,
        &[
            "call",
            "gecho",
            "UnaryEcho",
            r#"{"message": "__status__ 5 gone"}"#,
        ],
    );
    assert_eq!(code, 21, "{err}");
    assert!(err.contains("grpc-status 5: gone"), "{err}");
    let slow = r#"{"message": "slow", "sleepMs": 3000}"#;
    let (code, _, err) = fnmesh_call(
        &sc,
        &["call", "--timeout", "200ms", "gecho", "UnaryEcho", slow],
    );
    assert_eq!(code, 16, "{err}");
    let (code, _, _) = fnmesh_call(&sc, &["call", "gecho", "Nope", "{}"]);
    assert_eq!(code, 10);
}

/// gRPC functions through the gateway: the request from the `.proto`, the call through the
/// sidecar's own listener (the path gRPC callers take), from zero instances.
/// The kept HTTP/2 connection to the sidecar's own listener closed by the sidecar as idle:
/// the next gateway call makes a new one and succeeds.
#[test]
fn a_kept_grpc_connection_closed_as_idle_is_replaced() {
    let sc = Sidecar::start_with(
        "idle_timeout = \"300ms\"",
        &fnmesh_tests::sidecar::grpc_echo_function("gecho", "idle = \"30s\"", ""),
    );
    for round in 0..3 {
        let (status, v) = post(sc.addr, "/gecho/UnaryEcho", "", r#"{"message": "hi"}"#);
        assert_eq!(status, 200, "round {round}: {v}");
        std::thread::sleep(Duration::from_millis(900));
        let open = sc.metric("fnmesh_connections{protocol=\"grpc\"}");
        assert_eq!(open, 0.0, "round {round}: closed as idle");
    }
}

#[test]
fn json_calls_reach_a_volo_grpc_function_too() {
    let sc = Sidecar::start(&fnmesh_tests::sidecar::grpc_echo_function("gecho", "", ""));
    let (status, v) = post(sc.addr, "/gecho/UnaryEcho", "", r#"{"message": "hi"}"#);
    assert_eq!(
        (status, v),
        (200, json!({"message": "hi", "instance": "1"}))
    );
    let (status, v) = post(
        sc.addr,
        "/gecho/UnaryEcho",
        "",
        r#"{"message": "__status__ 5 gone"}"#,
    );
    assert_eq!(status, 502, "{v}");
    assert_eq!(
        v,
        json!({"error": "grpc-status", "code": 5, "message": "gone"})
    );
    let (status, v) = post(
        sc.addr,
        "/gecho/UnaryEcho",
        "fnmesh-timeout: 100ms\r\n",
        r#"{"message": "slow", "sleepMs": 2000}"#,
    );
    assert_eq!((status, &v["error"]), (504, &json!("timeout")), "{v}");
    let (status, v) = post(sc.addr, "/gecho/UnaryEcho", "", r#"{"bogus": 1}"#);
    assert_eq!((status, &v["error"]), (400, &json!("bad-request")), "{v}");
    assert!(v["message"].as_str().unwrap().contains("bogus"), "{v}");
    let (status, _) = post(sc.addr, "/gecho/ServerStreamingEcho", "", "{}");
    assert_eq!(status, 404);
    // The gateway keeps its HTTP/2 connections to its own listener (one per worker thread at
    // most) and multiplexes the calls on them, rather than connecting for each.
    for n in 0..20 {
        let body = format!(r#"{{"message": "m{n}"}}"#);
        assert_eq!(post(sc.addr, "/gecho/UnaryEcho", "", &body).0, 200);
    }
    // (A connection made for one call alone would be closing now: give it time to go.)
    std::thread::sleep(Duration::from_millis(300));
    let open = sc.metric("fnmesh_connections{protocol=\"grpc\"}");
    assert!((1.0..=2.0).contains(&open), "{open} gRPC connections open");
}
