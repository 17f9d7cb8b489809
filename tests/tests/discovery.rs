//! Discovery end to end: real Consul and etcd servers, real `fnmesh run` sidecars registering
//! their functions, and real Volo clients finding them by name through fnmesh's resolvers.
#![forbid(unsafe_code)]

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

#[cfg(feature = "etcd")]
use fnmesh_discovery::etcd;
use fnmesh_discovery::{consul, Endpoint, Resolver, Tls, VoloDiscover};
#[cfg(feature = "etcd")]
use fnmesh_tests::registries::Etcd;
use fnmesh_tests::{
    gen::volo_gen::echo::{EchoRequest, EchoServiceClientBuilder},
    registries::{Consul, Pki},
    sidecar::{echo_function, free_port, grpc_echo_function, Sidecar},
};
use futures_util::{Stream, StreamExt};
use serde_json::Value;
use volo::loadbalance::random::WeightedRandomBalance;

fn req(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_owned().into(),
        sleep_ms: None,
        meta: None,
    }
}

/// A sidecar serving the Thrift `echo` and the gRPC `gecho`, registered in `discovery`.
fn sidecar(discovery: &str) -> Sidecar {
    Sidecar::start(&format!(
        "[discovery]\n{discovery}\n\n{}{}",
        echo_function("echo", "", ""),
        grpc_echo_function("gecho", "", "")
    ))
}

fn consul_table(c: &Consul) -> String {
    format!(
        "backend = \"consul\"\naddress = \"{}\"\nttl = \"2s\"",
        c.url()
    )
}

#[cfg(feature = "etcd")]
fn etcd_table(e: &Etcd) -> String {
    format!(
        "backend = \"etcd\"\nendpoints = [\"{}\"]\nttl = \"2s\"",
        e.url()
    )
}

fn wait_until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One Volo call to `sc`'s `echo`, which must succeed (`why` says why it should).
async fn serves(sc: &Sidecar, message: &str, why: &str) {
    EchoServiceClientBuilder::new("echo")
        .address(sc.addr)
        .build()
        .echo(req(message))
        .await
        .expect(why);
}

/// One call by service name, through fnmesh's resolver in a Volo client.
async fn call_by_name<R: Resolver>(resolver: R) -> String {
    let discover = VoloDiscover::new(resolver);
    let client = EchoServiceClientBuilder::new("echo")
        .load_balance(WeightedRandomBalance::with_discover(&discover))
        .discover(discover)
        .build();
    match client.echo(req("by name")).await.expect("a call by name") {
        volo_thrift::MaybeException::Ok(r) => r.message.to_string(),
        volo_thrift::MaybeException::Exception(e) => panic!("{e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn consul_lists_each_function_and_a_volo_client_calls_it_by_name() {
    let consul = Consul::start();
    let sc = sidecar(&consul_table(&consul));
    wait_until(Duration::from_secs(10), "both registered", || {
        consul.passing("echo").len() == 1 && consul.passing("gecho").len() == 1
    });
    let id = format!("echo:127.0.0.1:{}", sc.addr.port());
    let entry = &consul.passing("echo")[0];
    let service = &entry["Service"];
    assert_eq!(service["ID"], Value::from(id.clone()));
    assert_eq!(service["Service"], "echo");
    assert_eq!(service["Address"], "127.0.0.1");
    assert_eq!(service["Port"], Value::from(sc.addr.port()));
    let tags: Vec<&str> = service["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        tags,
        [
            "idl_service:EchoService",
            "methods:Echo,Ping",
            "protocol:thrift"
        ]
    );
    assert_eq!(service["Meta"]["protocol"], "thrift");
    assert_eq!(service["Meta"]["idl_service"], "EchoService");
    assert_eq!(service["Weights"]["Passing"], 10);
    let check = entry["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["CheckID"] == format!("fnmesh:{id}"))
        .expect("fnmesh's TTL check");
    assert_eq!(check["Status"], "passing");
    let gecho = &consul.passing("gecho")[0]["Service"];
    assert_eq!(gecho["Meta"]["protocol"], "grpc");
    assert_eq!(gecho["Meta"]["idl_service"], "echo.Echo");

    assert_eq!(
        call_by_name(consul::Consul::new(&consul.url(), &Tls::default()).unwrap()).await,
        "by name"
    );
    let (status, body) = sc.admin_get("/readyz");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("registry consul: registered"), "{body}");
}

#[cfg(feature = "etcd")]
async fn etcd_client(e: &Etcd) -> etcd_client::Client {
    etcd_client::Client::connect([e.url()], None).await.unwrap()
}

/// The value under `key`, and its lease.
#[cfg(feature = "etcd")]
async fn etcd_get(e: &Etcd, key: &str) -> Option<(Value, i64)> {
    let got = etcd_client(e).await.get(key, None).await.ok()?;
    let kv = got.kvs().first()?;
    Some((serde_json::from_slice(kv.value()).ok()?, kv.lease()))
}

#[cfg(feature = "etcd")]
async fn wait_for_key(e: &Etcd, key: &str, within: Duration) -> (Value, i64) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = etcd_get(e, key).await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{key} not there within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread")]
async fn etcd_holds_the_documented_key_and_a_volo_client_calls_it_by_name() {
    let server = Etcd::start();
    let sc = sidecar(&etcd_table(&server));
    let key = format!("kitex/registry-etcd/echo/127.0.0.1:{}", sc.addr.port());
    let (value, lease) = wait_for_key(&server, &key, Duration::from_secs(10)).await;
    assert_eq!(
        value,
        serde_json::json!({
            "network": "tcp",
            "address": format!("127.0.0.1:{}", sc.addr.port()),
            "weight": 10,
            "tags": {"protocol": "thrift", "idl_service": "EchoService", "methods": "Echo,Ping"},
        })
    );
    assert_ne!(lease, 0, "the key is attached to a lease");
    let gecho = format!("kitex/registry-etcd/gecho/127.0.0.1:{}", sc.addr.port());
    let (value, _) = wait_for_key(&server, &gecho, Duration::from_secs(5)).await;
    assert_eq!(value["tags"]["protocol"], "grpc");

    let resolver = etcd::Etcd::new(&[server.url()], "kitex/registry-etcd", &Tls::default())
        .await
        .unwrap();
    assert_eq!(call_by_name(resolver).await, "by name");

    // A key that vanishes (deleted by hand) is put back within two TTLs.
    etcd_client(&server)
        .await
        .delete(key.as_str(), None)
        .await
        .unwrap();
    wait_for_key(&server, &key, Duration::from_secs(4)).await;
    let (_, body) = sc.admin_get("/readyz");
    assert!(body.contains("registry etcd: registered"), "{body}");
}

/// Waits until `stream` yields exactly the endpoints at `want`.
async fn until_endpoints(
    stream: &mut (impl Stream<Item = Result<Vec<Endpoint>, fnmesh_discovery::Error>> + Unpin),
    want: &[SocketAddr],
    within: Duration,
) {
    let got = tokio::time::timeout(within, async {
        loop {
            if let Some(Ok(list)) = stream.next().await {
                let mut addrs: Vec<SocketAddr> = list.iter().map(|e| e.address).collect();
                addrs.sort();
                if addrs == want {
                    return;
                }
            }
        }
    })
    .await;
    assert!(
        got.is_ok(),
        "the resolver did not yield {want:?} within {within:?}"
    );
}

async fn two_sidecars_come_and_go<R: Resolver>(table: &str, resolver: R) {
    let a = sidecar(table);
    let b = sidecar(table);
    let mut stream = Box::pin(resolver.resolve("echo"));
    let mut both = vec![a.addr, b.addr];
    both.sort();
    until_endpoints(&mut stream, &both, Duration::from_secs(10)).await;

    // SIGTERM: a leaves the registry while its listener still accepts.
    a.signal("TERM");
    until_endpoints(&mut stream, &[b.addr], Duration::from_secs(3)).await;
    assert!(
        TcpStream::connect(a.addr).is_ok(),
        "a was deregistered only after its listener closed"
    );

    // SIGKILL: b is gone within its TTL (2 s) plus the registry's own expiry.
    let killed = Instant::now();
    let mut b = b;
    b.child.kill().unwrap();
    until_endpoints(&mut stream, &[], Duration::from_secs(6)).await;
    println!(
        "a SIGKILLed sidecar left the resolver after {:?}",
        killed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn consul_two_sidecars_leave_on_sigterm_and_vanish_after_sigkill() {
    let server = Consul::start();
    two_sidecars_come_and_go(
        &consul_table(&server),
        consul::Consul::new(&server.url(), &Tls::default()).unwrap(),
    )
    .await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread")]
async fn etcd_two_sidecars_leave_on_sigterm_and_vanish_after_sigkill() {
    let server = Etcd::start();
    let resolver = etcd::Etcd::new(&[server.url()], "kitex/registry-etcd", &Tls::default())
        .await
        .unwrap();
    two_sidecars_come_and_go(&etcd_table(&server), resolver).await;
}

/// Calls `echo` on `addr` every 20 ms until told to stop; gives how many failed, of how many.
fn keep_calling(
    addr: SocketAddr,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<(usize, usize)>,
) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let client = EchoServiceClientBuilder::new("echo").address(addr).build();
        let (mut failed, mut calls) = (0, 0);
        while stopped.try_recv().is_err() {
            calls += 1;
            if client.echo(req("steady")).await.is_err() {
                failed += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (failed, calls)
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn registrations_come_back_after_consul_restarts_and_calls_never_fail() {
    let mut server = Consul::start();
    let sc = sidecar(&consul_table(&server));
    wait_until(Duration::from_secs(10), "registered", || {
        server.passing("echo").len() == 1
    });
    let (stop, calls) = keep_calling(sc.addr);
    // A restarted dev agent forgets every service: the sidecar registers again.
    server.restart();
    let up = Instant::now();
    wait_until(
        Duration::from_secs(4),
        "registered again within 2 x TTL",
        || server.passing("echo").len() == 1 && server.passing("gecho").len() == 1,
    );
    println!(
        "registered again {:?} after the agent was back",
        up.elapsed()
    );
    stop.send(()).unwrap();
    let (failed, made) = calls.await.unwrap();
    assert!(made > 10, "{made} calls");
    assert_eq!(failed, 0, "{failed} of {made} calls failed");
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread")]
async fn registrations_come_back_after_etcd_restarts_and_calls_never_fail() {
    let mut server = Etcd::start();
    let sc = sidecar(&etcd_table(&server));
    let key = format!("kitex/registry-etcd/echo/127.0.0.1:{}", sc.addr.port());
    wait_for_key(&server, &key, Duration::from_secs(10)).await;
    let (stop, calls) = keep_calling(sc.addr);
    // Down for longer than the TTL: the lease may run out meanwhile.
    server.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, body) = sc.admin_get("/readyz");
    assert!(body.contains("registry etcd: failing"), "{body}");
    server.restart();
    wait_for_key(&server, &key, Duration::from_secs(4)).await;
    stop.send(()).unwrap();
    let (failed, made) = calls.await.unwrap();
    assert!(made > 10, "{made} calls");
    assert_eq!(failed, 0, "{failed} of {made} calls failed");
    // And the lease is kept alive again: the key outlives several TTLs.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(etcd_get(&server, &key).await.is_some());
}

/// A sidecar whose registry (`backend`) is down at start: it serves, reports the outage, and
/// registers once the registry is up; gives the sidecar.
async fn down_at_start(backend: &str, port: u16) -> Sidecar {
    let table = match backend {
        "consul" => {
            format!("backend = \"consul\"\naddress = \"http://127.0.0.1:{port}\"\nttl = \"2s\"")
        }
        _ => format!("backend = \"etcd\"\nendpoints = [\"http://127.0.0.1:{port}\"]\nttl = \"2s\""),
    };
    let sc = sidecar(&table);
    serves(&sc, "serving", "served while the registry is down").await;
    let failing = format!("registry {backend}: failing");
    wait_until(Duration::from_secs(10), "the outage reported", || {
        sc.admin_get("/readyz").1.contains(&failing)
    });
    assert_eq!(sc.admin_get("/readyz").0, "HTTP/1.1 200 OK");
    sc
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_consul_at_start_is_reported_and_registration_follows() {
    let port = free_port();
    let sc = down_at_start("consul", port).await;
    let server = Consul::start_on(port);
    wait_until(Duration::from_secs(5), "registered once reachable", || {
        server.passing("echo").len() == 1
    });
    wait_until(Duration::from_secs(3), "reported registered", || {
        sc.admin_get("/readyz")
            .1
            .contains("registry consul: registered")
    });
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_etcd_at_start_is_reported_and_registration_follows() {
    let port = free_port();
    let sc = down_at_start("etcd", port).await;
    let server = Etcd::start_on(port);
    let key = format!("kitex/registry-etcd/echo/127.0.0.1:{}", sc.addr.port());
    wait_for_key(&server, &key, Duration::from_secs(10)).await;
    wait_until(Duration::from_secs(3), "reported registered", || {
        sc.admin_get("/readyz")
            .1
            .contains("registry etcd: registered")
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_adds_and_removes_registrations() {
    let server = Consul::start();
    let discovery = format!("[discovery]\n{}\n\n", consul_table(&server));
    let sc = Sidecar::start(&format!("{discovery}{}", echo_function("echo", "", "")));
    wait_until(Duration::from_secs(10), "echo registered", || {
        server.passing("echo").len() == 1
    });
    sc.rewrite(&format!("{discovery}{}", echo_function("fresh", "", "")));
    let (ok, said) = sc.reload();
    assert!(ok, "{said}");
    wait_until(Duration::from_secs(5), "fresh in, echo out", || {
        server.passing("fresh").len() == 1 && server.passing("echo").is_empty()
    });
}

/// Consul with ACLs enforced (default policy deny, issue 18, item 9): a sidecar with a token that
/// may register (here the management token) registers and keeps its functions passing; one
/// without a token is refused, and `/readyz` says so while the sidecar serves.
#[tokio::test(flavor = "multi_thread")]
async fn consul_with_acls_takes_a_sidecar_with_a_token_and_refuses_one_without() {
    let server = Consul::start_with_acl("fnmesh-test-token");
    let with = sidecar(&format!(
        "{}\ntoken = \"fnmesh-test-token\"",
        consul_table(&server)
    ));
    wait_until(Duration::from_secs(10), "registered with the token", || {
        server.passing("echo").len() == 1 && server.passing("gecho").len() == 1
    });
    let without = sidecar(&consul_table(&server));
    wait_until(Duration::from_secs(10), "refused without a token", || {
        let (_, body) = without.admin_get("/readyz");
        body.contains("registry consul: failing") && body.contains("403")
    });
    serves(&without, "served", "served all the same").await;
    assert_eq!(
        server.passing("echo").len(),
        1,
        "only the sidecar with the token"
    );
    drop(with);
}

/// etcd with auth on (issue 18, item 9): a sidecar with a user registers, keeps its key past its
/// TTL although its token expires between renewals (the cluster's tokens last 1 s unused,
/// renewals come every 2 s: an expired token is noticed and replaced), and resolves by name as
/// that user; one without a user is refused, and `/readyz` says so while the sidecar serves.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread")]
async fn etcd_with_auth_takes_a_sidecar_with_a_user_and_refuses_one_without() {
    let server = Etcd::start_with_auth("fnmesh-pw", 1);
    // Renewals every 2 s (a third of the TTL), so each finds its token expired.
    let with = sidecar(&format!(
        "backend = \"etcd\"\nendpoints = [\"{}\"]\nttl = \"6s\"\nusername = \"root\"\npassword = \"fnmesh-pw\"",
        server.url()
    ));
    let key = format!("kitex/registry-etcd/echo/127.0.0.1:{}", with.addr.port());
    // Read back with etcd-client as root, a new client (and token) each time.
    let present = || async {
        let options = etcd_client::ConnectOptions::new().with_user("root", "fnmesh-pw");
        let mut reader = etcd_client::Client::connect([server.url()], Some(options))
            .await
            .unwrap();
        reader.get(key.as_str(), None).await.unwrap().kvs().len() == 1
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !present().await {
        assert!(Instant::now() < deadline, "registered as root");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past the TTL: the key lives only if renewals with a fresh token went through.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        present().await,
        "still registered after eight token lifetimes"
    );
    let (_, body) = with.admin_get("/readyz");
    assert!(body.contains("registry etcd: registered"), "{body}");
    let resolver = etcd::Etcd::new(&[server.url()], "kitex/registry-etcd", &Tls::default())
        .await
        .unwrap()
        .with_auth("root", "fnmesh-pw");
    assert_eq!(call_by_name(resolver).await, "by name");

    let without = sidecar(&etcd_table(&server));
    wait_until(Duration::from_secs(10), "refused without a user", || {
        without
            .admin_get("/readyz")
            .1
            .contains("registry etcd: failing")
    });
    serves(&without, "served", "served all the same").await;
}

/// The TLS settings that trust `pki`'s CA and present its client certificate.
fn client_tls(pki: &Pki) -> Tls {
    Tls {
        ca_file: Some(pki.ca.clone()),
        cert_file: Some(pki.client_cert.clone()),
        key_file: Some(pki.client_key.clone()),
    }
}

/// Consul over HTTPS (issue 18, item 9): an agent that serves its API over TLS and wants a client
/// certificate of its CA. A sidecar that trusts the CA and presents one registers both
/// functions, and fnmesh's resolver finds `echo` over TLS; one that trusts another CA (the
/// agent's certificate fails verification), or presents no certificate (the agent's TLS alert),
/// is refused, `/readyz` says why, and it serves all the same.
#[tokio::test(flavor = "multi_thread")]
async fn consul_over_https_takes_a_sidecar_with_the_ca_and_a_client_certificate() {
    let pki = Pki::new();
    let server = Consul::start_with_tls(&pki);
    let https = |keys: &str| {
        format!(
            "backend = \"consul\"\naddress = \"{}\"\nttl = \"2s\"\n{keys}",
            server.https_url()
        )
    };
    let with = sidecar(&https(&pki.client_keys()));
    wait_until(Duration::from_secs(10), "registered over HTTPS", || {
        server.passing("echo").len() == 1 && server.passing("gecho").len() == 1
    });
    let (_, body) = with.admin_get("/readyz");
    assert!(body.contains("registry consul: registered"), "{body}");
    let resolver = consul::Consul::new(&server.https_url(), &client_tls(&pki)).unwrap();
    assert_eq!(call_by_name(resolver).await, "by name");

    let other = Pki::new();
    let wrong_ca = sidecar(&https(&other.client_keys()));
    let no_cert = sidecar(&https(&format!("ca_file = \"{}\"", pki.ca.display())));
    for (sc, why) in [
        (&wrong_ca, "invalid peer certificate"),
        (&no_cert, "fatal alert"),
    ] {
        wait_until(Duration::from_secs(10), why, || {
            let (_, body) = sc.admin_get("/readyz");
            body.contains("registry consul: failing") && body.contains(why)
        });
        serves(sc, "served", "served all the same").await;
    }
    assert_eq!(
        server.passing("echo").len(),
        1,
        "only the sidecar with both"
    );
}

/// etcd over TLS with client certificates (issue 18, item 9): `--client-cert-auth` on an https
/// client URL. A sidecar with the CA and a client certificate registers (read back through
/// the server's plain URL) and renews past its TTL, fnmesh's resolver resolves over TLS, and a
/// sidecar without a client certificate is refused while it serves.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread")]
async fn etcd_over_tls_takes_a_sidecar_with_a_client_certificate() {
    let pki = Pki::new();
    let server = Etcd::start_with_tls(&pki);
    let table = |keys: &str| {
        format!(
            "backend = \"etcd\"\nendpoints = [\"{}\"]\nttl = \"2s\"\n{keys}",
            server.https_url()
        )
    };
    let with = sidecar(&table(&pki.client_keys()));
    let key = format!("kitex/registry-etcd/echo/127.0.0.1:{}", with.addr.port());
    let present = || async {
        let mut reader = etcd_client::Client::connect([server.url()], None)
            .await
            .unwrap();
        reader.get(key.as_str(), None).await.unwrap().kvs().len() == 1
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !present().await {
        assert!(Instant::now() < deadline, "registered over TLS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past the TTL: the lease lives only if renewals over TLS went through.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(present().await, "still registered after two TTLs");
    let resolver = etcd::Etcd::new(
        &[server.https_url()],
        "kitex/registry-etcd",
        &client_tls(&pki),
    )
    .await
    .unwrap();
    assert_eq!(call_by_name(resolver).await, "by name");

    let no_cert = sidecar(&table(&format!("ca_file = \"{}\"", pki.ca.display())));
    wait_until(
        Duration::from_secs(10),
        "refused without a certificate",
        || {
            let (_, body) = no_cert.admin_get("/readyz");
            body.contains("registry etcd: failing") && body.contains("fatal alert")
        },
    );
    serves(&no_cert, "served", "served all the same").await;
}
