//! Metrics as their real consumer reads them (issue 19): a real Prometheus scrapes a real
//! sidecar's `/metrics` and answers PromQL over its HTTP API.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use fnmesh_tests::{
    gen::volo_gen::echo::{EchoRequest, EchoServiceClientBuilder},
    prometheus::Prometheus,
    proto::proto_gen::echo::{EchoClientBuilder, EchoRequest as GrpcRequest},
    sidecar::{echo_function, grpc_echo_function, Sidecar},
};

/// Prometheus takes fnmesh's exposition (OpenMetrics text) and a PromQL query over its API
/// returns the calls made: 5 Thrift and 4 gRPC calls, each counted once under its function,
/// method and outcome, and the latency histogram's count agrees.
#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_fnmesh_and_promql_counts_the_calls() {
    let sc = Sidecar::start(&format!(
        "{}{}",
        echo_function("echo", "min = 0", ""),
        grpc_echo_function("gecho", "min = 0", "")
    ));
    let thrift = EchoServiceClientBuilder::new("echo")
        .address(sc.addr)
        .build();
    for i in 0..5 {
        let req = EchoRequest {
            message: format!("m{i}").into(),
            sleep_ms: None,
            meta: None,
        };
        thrift.echo(req).await.expect("a Thrift call");
    }
    let grpc = EchoClientBuilder::new("gecho").address(sc.addr).build();
    for i in 0..4 {
        let req = GrpcRequest {
            message: format!("g{i}").into(),
            sleep_ms: 0,
        };
        grpc.unary_echo(req).await.expect("a gRPC call");
    }
    let prometheus = Prometheus::scraping(sc.admin);
    let queries = [
        (
            "sum(fnmesh_requests_total{function=\"echo\",method=\"Echo\",protocol=\"thrift\",outcome=\"ok\"})",
            5.0,
        ),
        (
            "sum(fnmesh_requests_total{function=\"gecho\",method=\"UnaryEcho\",protocol=\"grpc\",outcome=\"ok\"})",
            4.0,
        ),
        ("sum(fnmesh_requests_total)", 9.0),
        ("sum(fnmesh_request_duration_seconds_count)", 9.0),
        ("sum(fnmesh_cold_starts_total)", 2.0),
        ("up{job=\"fnmesh\"}", 1.0),
    ];
    for (query, want) in queries {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = prometheus.query(query);
            if got == Some(want) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{query}: {got:?}, not {want}\n{}",
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
