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

/// The Grafana dashboard in `docs/` is built on metrics fnmesh exposes: every panel's PromQL is
/// valid for a real Prometheus (its variables set as Grafana would: every function, a 1m rate
/// interval), names only metrics in a sidecar's `/metrics`, and the request-rate panel has data.
#[tokio::test(flavor = "multi_thread")]
async fn the_grafana_dashboard_queries_only_what_fnmesh_exposes() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/grafana-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    assert!(exprs.len() >= 13, "{exprs:?}");
    // A policy with every kind of governance, so that every series it can move is there.
    let sc = Sidecar::start(&echo_function(
        "echo",
        "min = 0",
        "circuit_breaker = { min_requests = 50 }\nretry = { attempts = 2, on = [\"connect\"] }\nrate_limit = { rps = 1000 }",
    ));
    let thrift = EchoServiceClientBuilder::new("echo")
        .address(sc.addr)
        .build();
    for _ in 0..3 {
        let req = EchoRequest {
            message: "d".into(),
            sleep_ms: None,
            meta: None,
        };
        thrift.echo(req).await.expect("a Thrift call");
    }
    let (_, exposed) = sc.admin_get("/metrics");
    for expr in &exprs {
        for name in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("fnmesh_"))
        {
            // A family is declared (`# TYPE`) even before it has a series.
            let family = ["_total", "_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            assert!(
                exposed.contains(&format!("# TYPE {family} ")),
                "{name} (in {expr}) is not in /metrics:\n{exposed}"
            );
        }
    }
    let prometheus = Prometheus::scraping(sc.admin);
    for expr in &exprs {
        let query = expr
            .replace("$function", ".*")
            .replace("$__rate_interval", "1m");
        let answer = prometheus.answer(&query).expect("an answer");
        assert_eq!(answer["status"], "success", "{query}: {answer}");
    }
    let rate = exprs[0]
        .replace("$function", ".*")
        .replace("$__rate_interval", "1m");
    let deadline = Instant::now() + Duration::from_secs(20);
    while prometheus.query(&rate).is_none() {
        assert!(
            Instant::now() < deadline,
            "{rate}: no data\n{}",
            prometheus.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
