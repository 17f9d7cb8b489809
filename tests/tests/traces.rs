//! Traces (issue 19, item 2): a real OTLP receiver (`tests/python/otlp_receiver.py`, built on
//! the official `opentelemetry-proto` package) receives fnmesh's spans, as children of the
//! caller's span, and the function receives fnmesh's span as its parent.
#![forbid(unsafe_code)]

use std::{
    cell::RefCell,
    io::BufRead,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fnmesh_tests::{
    gen::volo_gen::echo::{EchoRequest, EchoServiceClientBuilder},
    proto::proto_gen::echo::{EchoClientBuilder, EchoRequest as GrpcRequest},
    sidecar::{echo_function, free_port, grpc_echo_function, Sidecar},
};
use metainfo::{Forward, MetaInfo, METAINFO};
use serde_json::Value;

/// The receiver process, and the file its spans go to.
struct Receiver {
    child: Child,
    grpc: u16,
    http: u16,
    out: PathBuf,
}

impl Receiver {
    fn start() -> Receiver {
        let (grpc, http) = (free_port(), free_port());
        let out = std::env::temp_dir().join(format!("fnmesh-otlp-{}-{grpc}", std::process::id()));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/otlp_receiver.py");
        let mut child = Command::new("python3")
            .args([script, &grpc.to_string(), &http.to_string()])
            .arg(&out)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs (tests/run.sh installs opentelemetry-proto)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the OTLP receiver did not start");
        Receiver {
            child,
            grpc,
            http,
            out,
        }
    }

    /// The spans received so far.
    fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (up to 15 s: the batch processor exports every few seconds) for a span of trace
    /// `trace_id`.
    fn span_of(&self, trace_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = self.spans().into_iter().find(|s| s["trace_id"] == trace_id) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "no span of trace {trace_id}: {:?}",
                self.spans()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.out);
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// `00-{trace}-{span}-{flags}` split into its fields.
fn fields(traceparent: &str) -> Vec<String> {
    traceparent.split('-').map(str::to_owned).collect()
}

/// gRPC, exported over OTLP/gRPC: a volo-grpc call carrying a `traceparent` gets a span whose
/// parent is the caller's, the function receives that span as its parent (same trace), a call
/// without one starts a new trace, which the function also receives, and a Python grpcio call
/// with a context of its own is traced the same way.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_calls_are_traced_as_children_of_the_callers_span() {
    let receiver = Receiver::start();
    let sc = Sidecar::start(&format!(
        "[telemetry]\notlp_endpoint = \"http://127.0.0.1:{}\"\nservice_name = \"mesh-a\"\n\n{}",
        receiver.grpc,
        grpc_echo_function("gecho", "min = 0", "")
    ));
    let client = EchoClientBuilder::new("gecho").address(sc.addr).build();
    let mut req = volo_grpc::Request::new(GrpcRequest {
        message: "traced".into(),
        sleep_ms: 0,
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    let resp = client.unary_echo(req).await.expect("a call");
    let seen = resp
        .metadata()
        .get("x-traceparent")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let seen = fields(&seen);
    assert_eq!(
        (seen[1].as_str(), seen[3].as_str()),
        (TRACE, "01"),
        "{seen:?}"
    );
    assert_ne!(
        seen[2], CALLER_SPAN,
        "the function's parent is fnmesh's span"
    );

    let span = receiver.span_of(TRACE);
    assert_eq!(span["parent_span_id"], CALLER_SPAN, "{span}");
    assert_eq!(span["span_id"], seen[2], "{span}");
    assert_eq!(span["service"], "mesh-a");
    assert_eq!(span["kind"], 2, "SERVER");
    assert_eq!(span["attributes"]["rpc.system"], "grpc");
    assert_eq!(span["attributes"]["rpc.method"], "UnaryEcho");
    assert_eq!(span["attributes"]["fnmesh.function"], "gecho");
    assert_eq!(span["attributes"]["fnmesh.outcome"], "ok");
    // The first call waited for the instance's cold start.
    assert_eq!(span["attributes"]["fnmesh.instance"], 1);
    assert_eq!(span["attributes"]["fnmesh.cold_start"], true, "{span}");
    assert!(span["attributes"]["fnmesh.queue_wait_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(span["attributes"]["fnmesh.retries"], 0);

    // No context from the caller: a new trace, and the function still gets fnmesh's span.
    let resp = client
        .unary_echo(GrpcRequest {
            message: "root".into(),
            sleep_ms: 0,
        })
        .await
        .expect("a call");
    let root = fields(
        resp.metadata()
            .get("x-traceparent")
            .unwrap()
            .to_str()
            .unwrap(),
    );
    assert_ne!(root[1], TRACE);
    let span = receiver.span_of(&root[1]);
    assert_eq!(span["parent_span_id"], "", "a root span");
    assert_eq!(span["span_id"], root[2]);
    assert_eq!(span["attributes"]["fnmesh.cold_start"], false, "{span}");

    // Python grpcio, an independent gRPC client, carrying a context of its own.
    let other = "0af7651916cd43dd8448eb211c80319c";
    let out = fnmesh_tests::sidecar::python(
        "grpc_echo_client.py",
        &[
            &sc.addr.port().to_string(),
            "traced",
            &format!("00-{other}-b7ad6b7169203331-01"),
        ],
    );
    let seen = fields(out[0].trim());
    assert_eq!(seen[1], other, "{out:?}");
    let span = receiver.span_of(other);
    assert_eq!(span["parent_span_id"], "b7ad6b7169203331", "{span}");
    assert_eq!(span["span_id"], seen[2], "{span}");
}

/// Thrift, exported over OTLP/HTTP (protobuf): a Volo call carrying its trace context as
/// metainfo (TTHeader `RPC_TRANSIT_traceparent`) gets a span whose parent is the caller's, and
/// the Volo function reads fnmesh's span as its parent from its own metainfo; a call without a
/// context starts a trace, which the function reads the same way.
#[tokio::test(flavor = "multi_thread")]
async fn thrift_calls_are_traced_and_volo_functions_see_fnmeshs_span() {
    let receiver = Receiver::start();
    let sc = Sidecar::start(&format!(
        "[telemetry]\notlp_endpoint = \"http://127.0.0.1:{}\"\notlp_protocol = \"http/protobuf\"\naccess_log = true\n\n{}",
        receiver.http,
        echo_function("echo", "min = 1", "")
    ));
    let client = EchoServiceClientBuilder::new("echo")
        .address(sc.addr)
        .build();
    let seen = METAINFO
        .scope(RefCell::new(MetaInfo::default()), async {
            METAINFO.with(|m| {
                m.borrow_mut()
                    .set_transient("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01"))
            });
            let req = EchoRequest {
                message: "__traceparent__".into(),
                sleep_ms: None,
                meta: None,
            };
            client.echo(req).await
        })
        .await
        .expect("a call");
    let volo_thrift::MaybeException::Ok(seen) = seen else {
        panic!("a declared exception")
    };
    let seen = fields(&seen.message);
    assert_eq!(seen.get(1).map(String::as_str), Some(TRACE), "{seen:?}");
    assert_ne!(
        seen[2], CALLER_SPAN,
        "the function's parent is fnmesh's span"
    );
    let span = receiver.span_of(TRACE);
    assert_eq!(span["via"], "http");
    assert_eq!(span["parent_span_id"], CALLER_SPAN, "{span}");
    assert_eq!(span["span_id"], seen[2], "{span}");
    assert_eq!(span["attributes"]["rpc.system"], "thrift");
    assert_eq!(span["attributes"]["rpc.method"], "Echo");
    assert_eq!(span["attributes"]["fnmesh.outcome"], "ok");
    // The access log names the trace.
    let line: Value = serde_json::from_str(sc.stdout().lines().next().unwrap()).unwrap();
    assert_eq!(line["trace_id"], TRACE, "{line}");

    // A call with no context starts a trace at fnmesh, and the function still reads fnmesh's
    // span from its metainfo (fnmesh adds the transient key).
    let req = EchoRequest {
        message: "__traceparent__".into(),
        sleep_ms: None,
        meta: None,
    };
    let volo_thrift::MaybeException::Ok(root) = client.echo(req).await.expect("a call") else {
        panic!("a declared exception")
    };
    let root = fields(&root.message);
    assert_eq!(root.len(), 4, "{root:?}");
    assert_ne!(root[1], TRACE);
    let span = receiver.span_of(&root[1]);
    assert_eq!(span["parent_span_id"], "", "a root span");
    assert_eq!(span["span_id"], root[2], "{span}");
}

/// A sidecar stopped with SIGTERM exports the spans it still holds (the batch processor would
/// have sent them seconds later), and stops at once.
#[tokio::test(flavor = "multi_thread")]
async fn spans_still_held_are_exported_at_shutdown() {
    let receiver = Receiver::start();
    let mut sc = Sidecar::start(&format!(
        "[telemetry]\notlp_endpoint = \"http://127.0.0.1:{}\"\n\n{}",
        receiver.grpc,
        grpc_echo_function("gecho", "min = 0", "")
    ));
    let client = EchoClientBuilder::new("gecho").address(sc.addr).build();
    let mut req = volo_grpc::Request::new(GrpcRequest {
        message: "last".into(),
        sleep_ms: 0,
    });
    let trace = "5d1c3f2e4b6a7980a1b2c3d4e5f60718";
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    client.unary_echo(req).await.expect("a call");
    let stopped = Instant::now();
    sc.signal("TERM");
    let status = sc.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopped.elapsed()
    );
    // Already there: the batch processor's own schedule (5 s) did not send it.
    let span = receiver
        .spans()
        .into_iter()
        .find(|s| s["trace_id"] == trace);
    assert!(span.is_some(), "{:?}", receiver.spans());
}
