//! Egress end to end: functions calling other services through their sidecar's egress listener,
//! which finds them in a real Consul (and etcd) and governs the calls. Node A, node B and a
//! plain Volo server each run in their own network namespace (`ip netns`; root, as CI runs):
//! node B serves a gRPC function, the plain server is registered by hand, and node A's
//! function calls both through A's egress.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

#[cfg(feature = "etcd")]
use fnmesh_tests::registries::Etcd;
use fnmesh_tests::{
    gen::volo_gen::echo::{EchoRequest, EchoServiceClientBuilder},
    netns::Net,
    registries::Consul,
    sidecar::{echo_fn, echo_function, free_port, grpc_echo_function, Sidecar},
};

fn req(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_owned().into(),
        sleep_ms: None,
        meta: None,
    }
}

/// A plain Volo echo server on 127.0.0.1:`port`, knowing nothing of fnmesh; killed on drop.
struct Plain(Child);

impl Plain {
    fn start(port: u16) -> Plain {
        Plain::start_at(SocketAddr::from(([127, 0, 0, 1], port)), None)
    }

    /// The same on `addr`, in network namespace `ns` when given.
    fn start_at(addr: SocketAddr, ns: Option<&str>) -> Plain {
        let mut command = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, &echo_fn()]);
                c
            }
            None => Command::new(echo_fn()),
        };
        let port = addr.port();
        let child = command
            .env("PORT", port.to_string())
            .env("ECHO_FN_HOST", addr.ip().to_string())
            .env("FNMESH_INSTANCE", format!("plain-{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("echo-fn runs");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "echo-fn did not listen");
            std::thread::sleep(Duration::from_millis(5));
        }
        Plain(child)
    }
}

impl Drop for Plain {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One call to `echo` at `addr` (by name `to`): the reply's (message, instance), or the error.
async fn call(
    addr: SocketAddr,
    to: &str,
    message: &str,
    timeout: Duration,
) -> Result<(String, String), String> {
    let client = EchoServiceClientBuilder::new(to)
        .address(addr)
        .rpc_timeout(Some(timeout))
        .build();
    match client.echo(req(message)).await {
        Ok(volo_thrift::MaybeException::Ok(r)) => Ok((
            r.message.to_string(),
            r.instance.map(|i| i.to_string()).unwrap_or_default(),
        )),
        Ok(volo_thrift::MaybeException::Exception(e)) => Err(format!("{e:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// `in=MS last=WHAT` from the echo function's egress hook: the function's own deadline and the
/// last hop's, both as durations.
fn deadlines(answer: &str) -> (Duration, Duration, String) {
    let parse = |v: &str| -> Duration {
        match v.strip_suffix('u') {
            Some(us) => Duration::from_micros(us.parse().expect("micros")),
            None => match v.strip_suffix('m') {
                Some(ms) => Duration::from_millis(ms.parse().expect("millis")),
                None => Duration::from_millis(v.parse().unwrap_or_else(|_| panic!("{answer}"))),
            },
        }
    };
    let rest = answer
        .strip_prefix("in=")
        .unwrap_or_else(|| panic!("{answer}"));
    let (first, rest) = rest
        .split_once(" last=")
        .unwrap_or_else(|| panic!("{answer}"));
    let (last, via) = rest
        .split_once(" via=")
        .unwrap_or_else(|| panic!("{answer}"));
    (parse(first), parse(last), via.to_owned())
}

/// Node B serves the gRPC function `gecho`; a plain Volo server is registered as
/// `plain-echo` (by `register_plain`); node A's `echo` calls both through A's egress.
/// Each in its own network namespace of `net`: A (node 0), B (node 1), the plain server
/// (node 2).
async fn calls_cross_the_mesh(net: &Net, discovery: &str, register_plain: impl FnOnce(SocketAddr)) {
    let b = Sidecar::start_in(
        net.namespace(1),
        net.node(1),
        "",
        &format!(
            "[discovery]\n{discovery}\n\n{}",
            grpc_echo_function("gecho", "", "")
        ),
    );
    let plain = SocketAddr::new(net.node(2), free_port());
    let plain_port = plain.port();
    let _plain = Plain::start_at(plain, Some(net.namespace(2)));
    register_plain(plain);
    let egress = SocketAddr::new(net.node(0), free_port());
    let a = Sidecar::start_in(
        net.namespace(0),
        net.node(0),
        &format!("egress = \"{egress}\""),
        &format!(
            "[discovery]\n{discovery}\n\n{}",
            echo_function("echo", "", "")
        ),
    );
    let hop = Duration::from_secs(2);
    // gRPC, to a function only node B serves (found by its IDL service `echo.Echo`).
    let mut answer = String::new();
    wait_until(
        Duration::from_secs(10),
        "gecho is reachable through egress",
        || {
            answer = futures_executor(call(a.addr, "echo", "__egress__ grpc gecho", hop))
                .map(|(m, _)| m)
                .unwrap_or_else(|e| e);
            answer.starts_with("in=")
        },
    );
    let (first, last, via) = deadlines(&answer);
    assert!(first <= hop && first > hop / 2, "{answer}");
    assert!(
        last < first && !last.is_zero(),
        "the last hop's deadline is smaller: {answer}"
    );
    assert_eq!(via, "1", "node B's first instance answered: {answer}");
    assert_eq!(b.stat("gecho", "ready"), 1, "node B's instance served it");
    // Thrift, to a plain Volo server found by its registered name (Volo sets ToService).
    let (answer, _) = call(a.addr, "echo", "__egress__ thrift plain-echo", hop)
        .await
        .expect("a call through egress to a plain service");
    let (first, last, via) = deadlines(&answer);
    assert!(last < first && !last.is_zero(), "{answer}");
    assert_eq!(
        via,
        format!("plain-{plain_port}"),
        "the plain server answered: {answer}"
    );
    // The admin API lists the services egress reached, with their endpoints.
    let (_, body) = a.admin_get("/admin/functions");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let endpoints = |name: &str| {
        v["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .map(|s| s["endpoints"].as_u64().unwrap())
    };
    assert_eq!(endpoints("gecho"), Some(1), "{body}");
    assert_eq!(endpoints("plain-echo"), Some(1), "{body}");
    // Node A's own function has one peer-less registration: no other node serves `echo`.
    assert_eq!(v["functions"][0]["peers"]["nodes"], 0, "{body}");
    // A name the registry does not know: no-route, named.
    let (answer, _) = call(a.addr, "echo", "__egress__ thrift no-such-service", hop)
        .await
        .unwrap();
    assert!(
        answer.contains("no service for service no-such-service"),
        "{answer}"
    );
}

/// Runs a future on a fresh runtime from a synchronous closure (the test's own runtime is busy
/// in `wait_until`'s thread).
fn futures_executor<T: Send + 'static>(
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .join()
    .unwrap()
}

fn consul_table(c: &Consul) -> String {
    format!(
        "backend = \"consul\"\naddress = \"{}\"\nttl = \"2s\"",
        c.url()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn through_consul_a_function_calls_a_grpc_function_on_another_node_and_a_plain_volo_service()
{
    let net = Net::new(3);
    let consul = Consul::start_reachable_on(net.host());
    let table = format!(
        "backend = \"consul\"\naddress = \"{}\"\nttl = \"2s\"",
        consul.url_on(net.host())
    );
    calls_cross_the_mesh(&net, &table, |addr| {
        consul.register_plain_at("plain-echo", addr)
    })
    .await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread")]
async fn through_etcd_a_function_calls_a_grpc_function_on_another_node_and_a_plain_volo_service() {
    let net = Net::new(3);
    let etcd = Etcd::start_reachable_on(net.host());
    let table = format!(
        "backend = \"etcd\"\nendpoints = [\"{}\"]\nttl = \"2s\"",
        etcd.url_on(net.host())
    );
    let url = etcd.url();
    calls_cross_the_mesh(&net, &table, |addr| {
        // Kitex registry-etcd's layout, as a Kitex or Volo server registers itself.
        let key = format!("kitex/registry-etcd/plain-echo/{addr}");
        let value = format!(r#"{{"network":"tcp","address":"{addr}","weight":10,"tags":{{}}}}"#);
        futures_executor(async move {
            let mut client = etcd_client::Client::connect([url], None).await.unwrap();
            client.put(key, value, None).await.unwrap();
        });
    })
    .await;
}

/// Calls through egress to a service with two endpoints keep succeeding when one is killed:
/// a call that cannot reach an endpoint goes to the other (retry on connect, the default for
/// services), and the dead one is ejected after failures in a row.
#[tokio::test(flavor = "multi_thread")]
async fn egress_calls_survive_the_loss_of_an_endpoint_and_balance_over_both() {
    let consul = Consul::start();
    let (p1, p2) = (free_port(), free_port());
    let mut first = Some(Plain::start(p1));
    let _second = Plain::start(p2);
    consul.register_plain("plain-echo", p1);
    consul.register_plain("plain-echo", p2);
    let egress = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let _a = Sidecar::start_with(
        &format!("egress = \"{egress}\""),
        &format!("[discovery]\n{}\n\n", consul_table(&consul)),
    );
    let hop = Duration::from_secs(2);
    wait_until(Duration::from_secs(10), "plain-echo through egress", || {
        futures_executor(call(egress, "plain-echo", "x", hop)).is_ok()
    });
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..200 {
        let (m, instance) = call(egress, "plain-echo", &format!("m{i}"), hop)
            .await
            .expect("every call succeeds");
        assert_eq!(m, format!("m{i}"));
        *seen.entry(instance).or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "both endpoints serve: {seen:?}");
    assert!(seen.values().all(|n| *n >= 20), "balanced: {seen:?}");
    drop(first.take());
    for i in 0..100 {
        let (m, instance) = call(egress, "plain-echo", &format!("after {i}"), hop)
            .await
            .expect("no call fails after an endpoint died");
        assert_eq!(m, format!("after {i}"));
        assert_eq!(instance, format!("plain-{p2}"));
    }
}
