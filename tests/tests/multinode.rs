//! Several fnmesh nodes, each in its own network namespace, sharing one real Consul agent (and,
//! in one test, etcd): scale from zero across nodes, the loss of a node, and no forwarding
//! loop. Needs root (`ip netns`), as CI runs.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

#[cfg(feature = "etcd")]
use fnmesh_tests::registries::Etcd;
use fnmesh_tests::{
    gen::volo_gen::echo::{EchoRequest, EchoServiceClientBuilder},
    netns::Net,
    registries::Consul,
    sidecar::{echo_function, free_port, Sidecar},
};

/// One node: its sidecar, and its egress address.
struct Node {
    sidecar: Sidecar,
    egress: SocketAddr,
}

/// `n` nodes serving `echo` (with `scale` and `policy`, and `more` after the function table),
/// registered in `discovery` (a `[discovery]` body; `{host}` is replaced by the host side's
/// address).
fn nodes(net: &Net, n: usize, discovery: &str, scale: &str, policy: &str, more: &str) -> Vec<Node> {
    (0..n)
        .map(|i| {
            let egress = SocketAddr::new(net.node(i), free_port());
            let sidecar = Sidecar::start_in(
                net.namespace(i),
                net.node(i),
                &format!("egress = \"{egress}\""),
                &format!(
                    "[discovery]\n{discovery}\n\n{}{more}",
                    echo_function("echo", scale, policy)
                ),
            );
            Node { sidecar, egress }
        })
        .collect()
}

fn consul_table(consul: &Consul, net: &Net) -> String {
    format!(
        "backend = \"consul\"\naddress = \"{}\"\nttl = \"2s\"",
        consul.url_on(net.host())
    )
}

fn wait_until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One echo call to `addr` (by name `echo`), sleeping `sleep_ms` in the function.
async fn echo(addr: SocketAddr, message: &str, sleep_ms: i64) -> Result<String, String> {
    echo_within(addr, message, sleep_ms, Some(Duration::from_secs(10))).await
}

/// As [`echo`], with `timeout` as the call's deadline (none: the call carries none).
async fn echo_within(
    addr: SocketAddr,
    message: &str,
    sleep_ms: i64,
    timeout: Option<Duration>,
) -> Result<String, String> {
    let client = EchoServiceClientBuilder::new("echo")
        .address(addr)
        .rpc_timeout(timeout)
        .build();
    let req = EchoRequest {
        message: message.to_owned().into(),
        sleep_ms: (sleep_ms > 0).then_some(sleep_ms),
        meta: None,
    };
    match client.echo(req).await {
        Ok(volo_thrift::MaybeException::Ok(r)) => Ok(r.message.to_string()),
        Ok(volo_thrift::MaybeException::Exception(e)) => Err(format!("{e:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Instance processes on each node.
fn processes(nodes: &[Node]) -> Vec<usize> {
    nodes
        .iter()
        .map(|n| n.sidecar.stat("echo", "processes"))
        .collect()
}

/// Low load runs one instance for the whole mesh; more load spreads instances over the nodes;
/// idle brings every node back to zero.
async fn scale_from_zero_across(discovery: impl Fn(&Net) -> String) {
    let net = Net::new(3);
    let table = discovery(&net);
    let nodes = nodes(&net, 3, &table, "idle = \"2s\"\nconcurrency = 4", "", "");
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.sidecar.addr).collect();
    // Every node must know the other two before the first call.
    wait_until(Duration::from_secs(10), "every node registered", || {
        registered(&table) >= 3
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..100 {
        let addr = addrs[i % 3];
        // Every other call carries no deadline (it is forwarded all the same).
        let timeout = (i % 2 == 0).then_some(Duration::from_secs(10));
        let m = echo_within(addr, &format!("seq {i}"), 0, timeout)
            .await
            .expect("a call");
        assert_eq!(m, format!("seq {i}"));
    }
    assert_eq!(
        processes(&nodes).iter().sum::<usize>(),
        1,
        "100 sequential calls over 3 nodes started one instance in the mesh: {:?}",
        processes(&nodes)
    );
    // 64 callers at once, 4 calls each per instance: more than one node must run instances.
    let failed = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for c in 0..64 {
        let (addr, failed) = (addrs[c % 3], failed.clone());
        callers.push(tokio::spawn(async move {
            for i in 0..10 {
                if echo(addr, &format!("c{c} {i}"), 50).await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut peak = vec![0; 3];
    while callers.iter().any(|c| !c.is_finished()) {
        for (p, now) in peak.iter_mut().zip(processes(&nodes)) {
            *p = (*p).max(now);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in callers {
        c.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no concurrent call failed"
    );
    let busy = peak.iter().filter(|p| **p > 0).count();
    assert!(busy >= 2, "instances spread over the nodes: peak {peak:?}");
    // Idle: every node on its own back to zero.
    wait_until(Duration::from_secs(15), "every node back to zero", || {
        processes(&nodes).iter().all(|p| *p == 0)
    });
}

/// How many passing registrations of `echo` the registry in `table` holds.
fn registered(table: &str) -> usize {
    let address = table
        .lines()
        .find_map(|l| {
            l.strip_prefix("address = \"")
                .or(l.strip_prefix("endpoints = [\""))
        })
        .map(|a| a.trim_end_matches("\"]").trim_end_matches('"').to_owned())
        .unwrap_or_default();
    let port: u16 = address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    if table.contains("consul") {
        let (_, body) =
            fnmesh_tests::registries::http_get(port, "/v1/health/service/echo?passing=true", "");
        serde_json::from_str::<Vec<serde_json::Value>>(&body).map_or(0, |v| v.len())
    } else {
        let key = "a2l0ZXgvcmVnaXN0cnktZXRjZC9lY2hvLw=="; // "kitex/registry-etcd/echo/"
        let end = "a2l0ZXgvcmVnaXN0cnktZXRjZC9lY2hvMA=="; // "kitex/registry-etcd/echo0"
        let body = format!(r#"{{"key":"{key}","range_end":"{end}","count_only":true}}"#);
        let (_, text) =
            fnmesh_tests::registries::http_request(port, "POST", "/v3/kv/range", "", &body);
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["count"].as_str().and_then(|c| c.parse().ok()))
            .unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn through_consul_one_instance_serves_three_nodes_at_low_load_and_more_spread_then_idle_to_zero(
) {
    let consul_holder: std::cell::OnceCell<Consul> = std::cell::OnceCell::new();
    scale_from_zero_across(|net| {
        let consul = consul_holder.get_or_init(|| Consul::start_reachable_on(net.host()));
        consul_table(consul, net)
    })
    .await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread")]
async fn through_etcd_one_instance_serves_three_nodes_at_low_load_and_more_spread_then_idle_to_zero(
) {
    let holder: std::cell::OnceCell<Etcd> = std::cell::OnceCell::new();
    scale_from_zero_across(|net| {
        let etcd = holder.get_or_init(|| Etcd::start_reachable_on(net.host()));
        format!(
            "backend = \"etcd\"\nendpoints = [\"{}\"]\nttl = \"2s\"",
            etcd.url_on(net.host())
        )
    })
    .await;
}

/// SIGKILL one node under load: calls through the other nodes' egress lose none (the method is
/// idempotent and retries on `unavailable`), and the dead node leaves the registry's passing
/// set within its TTL.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_node_loses_no_idempotent_call_and_leaves_within_its_ttl() {
    let net = Net::new(3);
    let consul = Consul::start_reachable_on(net.host());
    let table = consul_table(&consul, &net);
    let policy = "retry = { attempts = 3, backoff = \"5ms\", on = [\"connect\", \"unavailable\"] }";
    let method = "[function.method.Echo]\nidempotent = true\n\n";
    let mut nodes = nodes(&net, 3, &table, "idle = \"30s\"", policy, method);
    wait_until(Duration::from_secs(10), "every node registered", || {
        consul.passing("echo").len() == 3
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Node 2 warms first: the other nodes' calls go to its instance.
    echo(nodes[2].sidecar.addr, "warm", 0).await.unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut callers = Vec::new();
    for c in 0..8 {
        let egress = nodes[c % 2].egress;
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        callers.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match echo(egress, "through egress", 20).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.push(e);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            errors
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = ok.load(Ordering::Relaxed);
    // Nodes 0 and 1 started nothing: their calls were all on node 2's instance.
    assert_eq!(
        processes(&nodes[..2]),
        [0, 0],
        "calls went to the warm node"
    );
    let killed = nodes.remove(2);
    drop(killed); // SIGKILL
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for c in callers {
        errors.extend(c.await.unwrap());
    }
    assert!(before > 20, "calls went through before the kill: {before}");
    assert!(ok.load(Ordering::Relaxed) > before, "and after it");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no call failed: {errors:?}"
    );
    wait_until(
        Duration::from_secs(6),
        "the dead node leaves the passing set",
        || consul.passing("echo").len() == 2,
    );
    let gone = t.elapsed();
    assert!(
        gone < Duration::from_secs(5),
        "left {gone:?} after the kill (ttl 2s)"
    );
}

/// Every node at `max` (one instance of one call each) under load: forwarded calls that find no
/// room are refused at once and served where they came in, so every call ends, each node
/// starts its own instance, and refusals stay bounded.
#[tokio::test(flavor = "multi_thread")]
async fn no_forwarding_loop_forms_with_every_node_at_max() {
    let net = Net::new(3);
    let consul = Consul::start_reachable_on(net.host());
    let table = consul_table(&consul, &net);
    let nodes = nodes(&net, 3, &table, "max = 1\nconcurrency = 1", "", "");
    wait_until(Duration::from_secs(10), "every node registered", || {
        consul.passing("echo").len() == 3
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = 3 * 4 * 5;
    let mut callers = Vec::new();
    for c in 0..12 {
        let addr = nodes[c % 3].sidecar.addr;
        callers.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            for i in 0..5 {
                if let Err(e) = echo(addr, &format!("{c} {i}"), 100).await {
                    failed.push(e);
                }
            }
            failed
        }));
    }
    let t = Instant::now();
    let mut failed = Vec::new();
    for c in callers {
        failed.extend(c.await.unwrap());
    }
    assert!(failed.is_empty(), "every call ends well: {failed:?}");
    // 60 calls of 100 ms on 3 instances of one call each: about 2 s with no waste.
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
    let series =
        "fnmesh_requests_total{function=\"echo\",method=\"Echo\",protocol=\"thrift\",outcome=";
    let count = |outcome: &str| -> f64 {
        nodes
            .iter()
            .map(|n| n.sidecar.metric(&format!("{series}\"{outcome}\"}}")))
            .sum()
    };
    let refused = count("not_warm");
    let served = count("ok");
    // Each call is counted once where it came in, and once more where a peer served it; a peer
    // refuses at most twice per call (two peers), and never passes a call on.
    assert!(
        served >= calls as f64 && served <= 2.0 * calls as f64,
        "ok {served}"
    );
    assert!(refused <= 2.0 * calls as f64, "not_warm {refused}");
    for n in &nodes {
        assert_eq!(n.sidecar.stat("echo", "processes"), 1, "every node at max");
    }
}

/// gRPC too: sequential calls over three nodes run one instance in the mesh, and concurrent
/// ones (which some peers refuse, and the nodes then serve themselves) all succeed.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_calls_share_one_instance_across_nodes() {
    use fnmesh_tests::proto::proto_gen::echo::{EchoClientBuilder, EchoRequest as GrpcRequest};
    let net = Net::new(3);
    let consul = Consul::start_reachable_on(net.host());
    let discovery = consul_table(&consul, &net);
    let nodes: Vec<Sidecar> = (0..3)
        .map(|i| {
            Sidecar::start_in(
                net.namespace(i),
                net.node(i),
                "",
                &format!(
                    "[discovery]\n{discovery}\n\n{}",
                    fnmesh_tests::sidecar::grpc_echo_function(
                        "gecho",
                        "idle = \"30s\"\nconcurrency = 4",
                        ""
                    )
                ),
            )
        })
        .collect();
    wait_until(Duration::from_secs(10), "every node registered", || {
        consul.passing("gecho").len() == 3
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let clients: Vec<_> = nodes
        .iter()
        .map(|n| {
            EchoClientBuilder::new("gecho")
                .address(n.addr)
                .rpc_timeout(Some(Duration::from_secs(10)))
                .build()
        })
        .collect();
    let call = |i: usize, sleep_ms: i64| {
        let client = clients[i % 3].clone();
        async move {
            let req = GrpcRequest {
                message: format!("m{i}").into(),
                sleep_ms,
            };
            client
                .unary_echo(req)
                .await
                .map(|r| r.into_inner().message.to_string())
        }
    };
    for i in 0..60 {
        assert_eq!(call(i, 0).await.expect("a call"), format!("m{i}"));
    }
    let running: Vec<usize> = nodes.iter().map(|n| n.stat("gecho", "processes")).collect();
    assert_eq!(
        running.iter().sum::<usize>(),
        1,
        "one instance: {running:?}"
    );
    let burst: Vec<_> = (0..48).map(|i| tokio::spawn(call(i, 100))).collect();
    for (i, b) in burst.into_iter().enumerate() {
        assert_eq!(
            b.await.unwrap().expect("a concurrent call"),
            format!("m{i}")
        );
    }
    let running: Vec<usize> = nodes.iter().map(|n| n.stat("gecho", "processes")).collect();
    assert!(
        running.iter().filter(|p| **p > 0).count() >= 2,
        "instances spread: {running:?}"
    );
}

/// A node whose calls in flight on a peer fill one of its own instances starts one, though the
/// peer still has room: steady load is served where it arrives, without the extra hop.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_forwarded_calls_fill_an_instance_starts_its_own() {
    let net = Net::new(2);
    let consul = Consul::start_reachable_on(net.host());
    let table = consul_table(&consul, &net);
    let discovery = format!("[discovery]\n{table}\n\n");
    let warm = echo_function("echo", "min = 1\nconcurrency = 64\nidle = \"30s\"", "");
    let b = Sidecar::start_in(
        net.namespace(1),
        net.node(1),
        "",
        &format!("{discovery}{warm}"),
    );
    let cold = echo_function("echo", "concurrency = 4\nidle = \"30s\"", "");
    let a = Sidecar::start_in(
        net.namespace(0),
        net.node(0),
        "",
        &format!("{discovery}{cold}"),
    );
    wait_until(Duration::from_secs(10), "both registered, B warm", || {
        consul.passing("echo").len() == 2 && b.stat("echo", "ready") == 1
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // One call at a time goes to B's instance: A starts nothing.
    for i in 0..10 {
        echo(a.addr, &format!("one {i}"), 0).await.unwrap();
    }
    assert_eq!(a.stat("echo", "processes"), 0, "a trickle is forwarded");
    let callers: Vec<_> = (0..16)
        .map(|c| {
            let addr = a.addr;
            tokio::spawn(async move {
                for i in 0..5 {
                    echo(addr, &format!("{c} {i}"), 100).await.unwrap();
                }
            })
        })
        .collect();
    for c in callers {
        c.await.unwrap();
    }
    assert!(a.stat("echo", "processes") >= 1, "A started its own");
    assert_eq!(b.stat("echo", "processes"), 1, "B had room all along");
}
