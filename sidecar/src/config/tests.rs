use std::path::{Path, PathBuf};

use fnmesh_discovery::Tls;

use super::*;

fn base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "fnmesh.toml", &base())
}

fn err(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

const GOOD: &str = r#"
[sidecar]
listen = "127.0.0.1:8888"
admin = "127.0.0.1:9901"
drain_timeout = "2s"
max_frame_size = "1MiB"

[discovery]
backend = "none"

[[function]]
name = "echo"
protocol = "thrift"
idl = "idl/thrift/echo.thrift"
command = ["/bin/true", "--flag"]
env = { RUST_LOG = "warn" }

[function.scale]
min = 0
max = 4
concurrency = 8
idle = "500ms"
startup_timeout = "3s"
queue = 100

[function.policy]
timeout = "1s"

[function.method.Echo]
timeout = "5s"
"#;

#[test]
fn thrift_protocol_is_binary_unless_set_and_only_for_thrift() {
    use fnmesh_idl::thrift_json::Protocol as Thrift;
    assert_eq!(
        parse(GOOD).unwrap().functions[0].thrift_protocol,
        Thrift::Binary
    );
    let set = |v: &str| GOOD.replacen("idl = ", &format!("thrift_protocol = \"{v}\"\nidl = "), 1);
    assert_eq!(
        parse(&set("compact")).unwrap().functions[0].thrift_protocol,
        Thrift::Compact
    );
    assert_eq!(
        parse(&set("binary")).unwrap().functions[0].thrift_protocol,
        Thrift::Binary
    );
    let grpc = set("compact")
        .replacen("protocol = \"thrift\"", "protocol = \"grpc\"", 1)
        .replacen("idl/thrift/echo.thrift", "idl/proto/echo.proto", 1)
        .replacen("[function.method.Echo]", "[function.method.UnaryEcho]", 1);
    let e = err(&grpc);
    assert!(
        e.contains("function[echo].thrift_protocol: a gRPC function has none"),
        "{e}"
    );
}

#[test]
fn the_documented_file_parses_into_typed_values() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.functions[0].transport, Transport::Tcp, "the default");
    let unix = GOOD.replacen(
        "protocol = \"thrift\"",
        "protocol = \"thrift\"\ntransport = \"unix\"",
        1,
    );
    assert_eq!(
        parse(&unix).unwrap().functions[0].transport,
        Transport::Unix
    );
    assert_eq!(c.sidecar.listen.to_string(), "127.0.0.1:8888");
    assert_eq!(
        c.sidecar.advertise, c.sidecar.listen,
        "advertise defaults to listen"
    );
    assert_eq!(c.sidecar.drain_timeout, Duration::from_secs(2));
    assert_eq!(c.sidecar.max_frame_size, 1 << 20);
    assert_eq!(
        c.sidecar.workers,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        "one worker per CPU by default"
    );
    let with = parse(&GOOD.replacen("max_frame_size", "workers = 3\nmax_frame_size", 1)).unwrap();
    assert_eq!(with.sidecar.workers, 3);
    assert_eq!(c.sidecar.busy_poll, Duration::from_micros(50), "default");
    let off =
        parse(&GOOD.replacen("max_frame_size", "busy_poll = \"0s\"\nmax_frame_size", 1)).unwrap();
    assert_eq!(off.sidecar.busy_poll, Duration::ZERO);
    let engine = err(&GOOD.replacen("max_frame_size", "grpc_engine = \"h2\"\nmax_frame_size", 1));
    assert!(
        engine.contains("fnmesh.toml:6:")
            && engine.contains("sidecar.grpc_engine")
            && engine.contains("was removed"),
        "{engine}"
    );
    let f = &c.functions[0];
    assert_eq!(f.name, "echo");
    assert_eq!(
        f.service.as_deref(),
        Some("EchoService"),
        "the IDL's only service"
    );
    assert_eq!(f.command, ["/bin/true", "--flag"]);
    assert_eq!(f.scale.idle, Duration::from_millis(500));
    assert_eq!(f.scale.concurrency, 8);
    assert_eq!(f.policy_for("Ping").timeout, Some(Duration::from_secs(1)));
    assert_eq!(f.policy_for("Echo").timeout, Some(Duration::from_secs(5)));
    assert!(f.has_method("Echo") && f.has_method("Ping") && !f.has_method("Nope"));
    assert!(f.is_oneway("Ping") && !f.is_oneway("Echo"));
    assert_eq!(f.policy_for("Echo").rate_limit, None);
}

/// A line added to the function's `[function.policy]` (line 28) is refused with an error that
/// holds every needle and the line.
fn assert_policy_refused(line: &str, needles: &[&str]) {
    let text = err(&GOOD.replacen(
        "timeout = \"1s\"\n",
        &format!("timeout = \"1s\"\n{line}\n"),
        1,
    ));
    for n in needles.iter().chain(&["fnmesh.toml:28"]) {
        assert!(text.contains(n), "{line}: {text:?} should contain {n:?}");
    }
}

#[test]
fn circuit_breakers_parse_with_defaults_and_per_method() {
    let c = parse(
        &GOOD
            .replacen(
                "timeout = \"1s\"\n",
                "timeout = \"1s\"\ncircuit_breaker = { min_requests = 4 }\n",
                1,
            )
            .replacen(
                "timeout = \"5s\"",
                "circuit_breaker = { window = \"2s\", failure_ratio = 0.25, open = \"300ms\" }",
                1,
            ),
    )
    .unwrap();
    let f = &c.functions[0];
    assert_eq!(
        f.policy_for("Ping").circuit_breaker,
        Some(CircuitBreaker {
            min_requests: 4,
            ..CircuitBreaker::default()
        })
    );
    assert_eq!(
        f.policy_for("Echo").circuit_breaker,
        Some(CircuitBreaker {
            window: Duration::from_secs(2),
            min_requests: 20,
            failure_ratio: 0.25,
            open: Duration::from_millis(300),
        })
    );
    for (bad, needles) in [
        (
            "circuit_breaker = { window = \"0s\" }",
            &["circuit_breaker.window", "greater than zero"][..],
        ),
        (
            "circuit_breaker = { open = 5 }",
            &["circuit_breaker.open", "a duration"],
        ),
        (
            "circuit_breaker = { open = \"5 days\" }",
            &["circuit_breaker.open", "bad duration"],
        ),
        (
            "circuit_breaker = { min_requests = 0 }",
            &["circuit_breaker.min_requests", "at least 1"],
        ),
        (
            "circuit_breaker = { failure_ratio = 1.5 }",
            &["circuit_breaker.failure_ratio", "(0, 1]"],
        ),
        (
            "circuit_breaker = { ratio = 0.5 }",
            &["circuit_breaker", "unknown key \"ratio\""],
        ),
        (
            "circuit_breaker = true",
            &["circuit_breaker", "must be a table"],
        ),
    ] {
        assert_policy_refused(bad, needles);
    }
}

#[test]
fn retries_parse_with_defaults_and_idempotence_per_method() {
    let c = parse(
        &GOOD
            .replacen(
                "timeout = \"1s\"\n",
                "timeout = \"1s\"\nretry = { attempts = 3, on = [\"connect\", \"timeout\"] }\n",
                1,
            )
            .replacen("timeout = \"5s\"", "idempotent = true", 1),
    )
    .unwrap();
    let f = &c.functions[0];
    let want = Retry {
        attempts: 3,
        backoff: Duration::from_millis(10),
        on_connect: true,
        on_unavailable: false,
        on_timeout: true,
    };
    assert_eq!(f.policy_for("Echo").retry, Some(want));
    assert_eq!(f.policy_for("Echo").idempotent, Some(true));
    assert_eq!(f.policy_for("Ping").idempotent, None);
    let c =
        parse(&GOOD.replacen("timeout = \"1s\"\n", "timeout = \"1s\"\nretry = {}\n", 1)).unwrap();
    assert_eq!(
        c.functions[0].policy.retry,
        Some(Retry {
            attempts: 2,
            on_timeout: false,
            ..want
        }),
        "defaults: 2 attempts, 10ms, on connect"
    );
    // gRPC functions take the same retry policy.
    let grpc = |retry: &str| {
        GOOD.replacen("protocol = \"thrift\"", "protocol = \"grpc\"", 1)
            .replacen("idl/thrift/echo.thrift", "idl/proto/echo.proto", 1)
            .replacen("[function.method.Echo]", "[function.method.UnaryEcho]", 1)
            .replacen("timeout = \"5s\"", retry, 1)
    };
    let c = parse(&grpc(
        "retry = { attempts = 3, on = [\"connect\", \"unavailable\"] }",
    ))
    .unwrap();
    let r = c.functions[0].policy_for("UnaryEcho").retry.unwrap();
    assert_eq!(
        (r.attempts, r.on_unavailable, r.on_timeout),
        (3, true, false)
    );
}

#[test]
fn rate_limits_parse_per_function_and_per_method() {
    let c = parse(
        &GOOD
            .replacen(
                "timeout = \"1s\"\n",
                "timeout = \"1s\"\nrate_limit = { rps = 2.5 }\n",
                1,
            )
            .replacen(
                "timeout = \"5s\"",
                "rate_limit = { rps = 100, burst = 7 }",
                1,
            ),
    )
    .unwrap();
    let f = &c.functions[0];
    assert_eq!(
        f.policy_for("Ping").rate_limit,
        Some(RateLimit { rps: 2.5, burst: 3 }),
        "burst defaults to one second's worth"
    );
    assert_eq!(
        f.policy_for("Echo").rate_limit,
        Some(RateLimit {
            rps: 100.0,
            burst: 7
        }),
        "the method's own"
    );
    assert_eq!(
        f.policy_for("Echo").timeout,
        Some(Duration::from_secs(1)),
        "inherited"
    );
    for (bad, needles) in [
        (
            "rate_limit = { rps = 0 }",
            &["policy.rate_limit.rps", "not between"][..],
        ),
        (
            "rate_limit = { rps = \"fast\" }",
            &["policy.rate_limit.rps", "a number"],
        ),
        (
            "rate_limit = { burst = 3 }",
            &["policy.rate_limit.rps", "required"],
        ),
        (
            "rate_limit = { rps = 5, burst = 0 }",
            &["policy.rate_limit.burst", "at least 1"],
        ),
        (
            "rate_limit = { rps = 5, brust = 2 }",
            &["policy.rate_limit", "unknown key \"brust\""],
        ),
        ("rate_limit = 5", &["policy.rate_limit", "must be a table"]),
    ] {
        assert_policy_refused(bad, needles);
    }
}

/// Edits of the good file, each with what its error must say: the key and the line.
const BAD_EDITS: &[(&str, &str, &[&str])] = &[
    (
        "[function.scale]\nmin = 0",
        "[function.scale]\nmin = 0\nmxa = 3",
        &["mxa", "line 20"],
    ),
    (
        "idle = \"500ms\"",
        "idle = \"500 parsecs\"",
        &["bad duration", "line 22"],
    ),
    (
        "min = 0\nmax = 4",
        "min = 5\nmax = 4",
        &[
            "fnmesh.toml:18",
            "scale.min",
            "min (5) is greater than max (4)",
        ],
    ),
    (
        "timeout = \"1s\"\n\n[function.method",
        "timeout = \"1s\"\nretry = { attempts = 20 }\n\n[function.method",
        &["fnmesh.toml:28", "policy.retry.attempts", "from 1 to 10"],
    ),
    (
        "timeout = \"1s\"\n\n[function.method",
        "timeout = \"1s\"\nretry = { on = [\"always\"] }\n\n[function.method",
        &[
            "fnmesh.toml:28",
            "policy.retry.on",
            "\"always\" is not one of",
        ],
    ),
    (
        "timeout = \"1s\"\n\n[function.method",
        "timeout = \"1s\"\nidempotent = \"yes\"\n\n[function.method",
        &["idempotent", "line 28"],
    ),
    (
        "/bin/true",
        "/nonexistent/echo-fn",
        &[
            "fnmesh.toml:15",
            "command",
            "\"/nonexistent/echo-fn\" not found",
        ],
    ),
    (
        "[function.method.Echo]",
        "[function.method.Nope]",
        &["method.Nope", "no such method"],
    ),
    (
        "backend = \"none\"",
        "backend = \"zookeeper\"",
        &[
            "fnmesh.toml:9",
            "discovery.backend",
            "not one of none, consul, etcd",
        ],
    ),
    (
        "backend = \"none\"",
        "backend = \"consul\"\naddress = \"https://127.0.0.1:8500/v1\"",
        &[
            "fnmesh.toml:10",
            "discovery.address",
            "is not http://host:port",
        ],
    ),
    (
        "backend = \"none\"",
        "backend = \"consul\"\nprefix = \"x\"",
        &[
            "fnmesh.toml:10",
            "discovery.prefix",
            "does not apply to backend \"consul\"",
        ],
    ),
    (
        "backend = \"none\"",
        "backend = \"consul\"\nttl = \"1s\"",
        &["discovery.ttl", "at least 2s"],
    ),
    (
        "listen = \"127.0.0.1:8888\"",
        "listen = \"localhost\"",
        &["fnmesh.toml:3", "sidecar.listen"],
    ),
    (
        "protocol = \"thrift\"",
        "protocol = \"http\"",
        &["fnmesh.toml:13", "protocol", "not one of thrift, grpc"],
    ),
    (
        "backend = \"none\"",
        "backend = \"none\"\n\n[telemetry]\naccess_log = true\naccess_log_ratio = 1.5",
        &["telemetry.access_log_ratio", "not in (0, 1]"],
    ),
    (
        "protocol = \"thrift\"",
        "protocol = \"thrift\"\nthrift_protocol = \"json\"",
        &[
            "fnmesh.toml:14",
            "function[echo].thrift_protocol",
            "not one of binary, compact",
        ],
    ),
    (
        "protocol = \"thrift\"",
        "protocol = \"thrift\"\ntransport = \"pipe\"",
        &[
            "fnmesh.toml:14",
            "function[echo].transport",
            "not one of tcp, unix",
        ],
    ),
    (
        "idl/thrift/echo.thrift",
        "idl/thrift/missing.thrift",
        &["fnmesh.toml:14", "idl", "missing.thrift"],
    ),
    (
        "max_frame_size = \"1MiB\"",
        "max_frame_size = \"1 lightyear\"",
        &["bad size", "line 6"],
    ),
    (
        "max_frame_size = \"1MiB\"",
        "max_frame_size = \"1MiB\"\nworkers = 0",
        &["fnmesh.toml:7", "sidecar.workers", "not between 1 and 256"],
    ),
    (
        "max_frame_size = \"1MiB\"",
        "max_frame_size = \"1MiB\"\nbusy_poll = \"2ms\"",
        &["line 7", "busy_poll", "over 1ms"],
    ),
];

#[test]
fn errors_name_the_key_and_the_line() {
    for (from, to, needles) in BAD_EDITS {
        assert!(GOOD.contains(from), "{from}");
        let text = err(&GOOD.replacen(from, to, 1));
        for n in *needles {
            assert!(text.contains(n), "{to:?}: {text:?} should contain {n:?}");
        }
    }
}

#[test]
fn duplicate_functions_and_bad_names_are_refused() {
    let twice = format!(
        "{GOOD}\n[[function]]\nname = \"echo\"\nprotocol = \"thrift\"\ncommand = [\"/bin/true\"]\n"
    );
    assert!(err(&twice).contains("configured twice"));
    assert!(
        err(&GOOD.replacen("name = \"echo\"", "name = \"ec ho\"", 1)).contains("function.name")
    );
}

#[test]
fn durations_and_sizes() {
    assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert!(parse_duration("10").is_err());
    assert!(parse_duration("s").is_err());
    assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
    assert_eq!(parse_size("64KB").unwrap(), 64_000);
    assert_eq!(parse_size("4096").unwrap(), 4096);
    assert!(parse_size("5GiB").is_err());
    assert!(parse_size("-1").is_err());
}

#[test]
fn discovery_backends_parse_with_their_defaults() {
    let with = |table: &str| parse(&GOOD.replacen("backend = \"none\"", table, 1)).unwrap();
    assert_eq!(parse(GOOD).unwrap().discovery, DiscoveryConfig::default());
    assert_eq!(
        with("backend = \"consul\"").discovery,
        DiscoveryConfig {
            backend: DiscoveryBackend::Consul {
                address: "http://127.0.0.1:8500".into(),
                token: std::env::var("CONSUL_HTTP_TOKEN")
                    .ok()
                    .filter(|t| !t.is_empty()),
                tls: Tls::default(),
            },
            ttl: Duration::from_secs(10),
        }
    );
    assert_eq!(
        with("backend = \"consul\"\naddress = \"http://10.0.0.1:8500\"\ntoken = \"s3cret\"\nttl = \"3s\"")
            .discovery,
        DiscoveryConfig {
            backend: DiscoveryBackend::Consul {
                address: "http://10.0.0.1:8500".into(),
                token: Some("s3cret".into()),
                tls: Tls::default(),
            },
            ttl: Duration::from_secs(3),
        }
    );
    let bad = |table: &str| {
        parse(&GOOD.replacen("backend = \"none\"", table, 1))
            .unwrap_err()
            .to_string()
    };
    let e = bad("backend = \"consul\"\ntoken = \"a\\nb\"");
    assert!(
        e.contains("discovery.token") && e.contains("cannot have"),
        "{e}"
    );
    let e = bad("backend = \"etcd\"\nusername = \"root\"");
    assert!(
        e.contains("discovery.password") && e.contains("needed"),
        "{e}"
    );
    let e = bad("backend = \"etcd\"\ntoken = \"t\"");
    assert!(
        e.contains("discovery.token") && e.contains("does not apply"),
        "{e}"
    );
    let etcd = parse(&GOOD.replacen("backend = \"none\"", "backend = \"etcd\"", 1));
    // etcd is in every build.
    assert_eq!(
        etcd.unwrap().discovery.backend,
        DiscoveryBackend::Etcd {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "kitex/registry-etcd".into(),
            user: std::env::var("ETCDCTL_USER").ok().and_then(|v| {
                let (u, p) = v.split_once(':')?;
                Some((u.to_owned(), p.to_owned()))
            }),
            tls: Tls::default(),
        }
    );
}

#[test]
fn registry_tls_files_are_read_from_the_files_folder_and_checked() {
    let with = |table: &str| parse(&GOOD.replacen("backend = \"none\"", table, 1));
    // Any existing file stands in for a PEM file here: its content is read at start.
    let c = with("backend = \"consul\"\naddress = \"https://consul.internal:8501\"\nca_file = \"idl/thrift/echo.thrift\"\ncert_file = \"idl/proto/echo.proto\"\nkey_file = \"idl/proto/echo.proto\"").unwrap();
    let DiscoveryBackend::Consul { tls, .. } = c.discovery.backend else {
        panic!("consul")
    };
    assert_eq!(tls.ca_file, Some(base().join("idl/thrift/echo.thrift")));
    assert_eq!(tls.key_file, Some(base().join("idl/proto/echo.proto")));
    let c = with("backend = \"etcd\"\nendpoints = [\"https://10.0.0.1:2379\", \"https://10.0.0.2:2379\"]\nca_file = \"idl/thrift/echo.thrift\"").unwrap();
    let DiscoveryBackend::Etcd { tls, .. } = c.discovery.backend else {
        panic!("etcd")
    };
    assert_eq!(tls.ca_file, Some(base().join("idl/thrift/echo.thrift")));
    for (table, want) in [
        ("backend = \"consul\"\nca_file = \"idl/thrift/echo.thrift\"", "needs an https:// address"),
        ("backend = \"consul\"\naddress = \"https://h:1\"\nca_file = \"missing.pem\"", "no such file"),
        ("backend = \"consul\"\naddress = \"https://h:1\"\ncert_file = \"idl/thrift/echo.thrift\"", "key_file go together"),
        ("backend = \"etcd\"\nendpoints = [\"https://a:1\", \"http://b:1\"]", "mixes http:// and https://"),
        ("backend = \"none\"\nca_file = \"idl/thrift/echo.thrift\"", "does not apply"),
        ("backend = \"consul\"\naddress = \"ftp://h:1\"", "not http://host:port or https://host:port"),
    ] {
        let e = with(table).unwrap_err().to_string();
        assert!(e.contains(want), "{table}: {e}");
        assert!(e.contains("discovery."), "{table}: {e}");
    }
}

#[test]
fn a_registry_needs_an_address_callers_can_reach() {
    let any = GOOD.replacen(
        "listen = \"127.0.0.1:8888\"",
        "listen = \"0.0.0.0:8888\"",
        1,
    );
    assert!(
        parse(&any).is_ok(),
        "nothing is registered with backend none"
    );
    let e = err(&any.replacen("backend = \"none\"", "backend = \"consul\"", 1));
    for want in [
        "fnmesh.toml:3",
        "sidecar.advertise",
        "0.0.0.0:8888 cannot be registered",
    ] {
        assert!(e.contains(want), "{e}");
    }
    let advertised = any
        .replacen("backend = \"none\"", "backend = \"consul\"", 1)
        .replacen(
            "listen = \"0.0.0.0:8888\"",
            "listen = \"0.0.0.0:8888\"\nadvertise = \"10.0.0.7:8888\"",
            1,
        );
    assert_eq!(
        parse(&advertised).unwrap().sidecar.advertise,
        "10.0.0.7:8888".parse().unwrap()
    );
}

#[test]
fn egress_and_services_parse_and_instances_learn_the_egress() {
    let text = GOOD.replacen(
        "drain_timeout",
        "egress = \"127.0.0.1:8889\"\ndrain_timeout",
        1,
    ) + r#"
[[service]]
name = "gecho"
protocol = "grpc"
idl = "idl/proto/echo.proto"

[service.policy]
timeout = "200ms"
idempotent = true

[service.method.UnaryEcho]
retry = { attempts = 3, on = ["connect", "unavailable"] }

[[service]]
name = "legacy"
protocol = "thrift"
service = "LegacyService"
"#;
    let c = parse(&text).unwrap();
    assert_eq!(c.sidecar.egress, Some("127.0.0.1:8889".parse().unwrap()));
    assert_eq!(
        c.functions[0].env.get("FNMESH_EGRESS").map(String::as_str),
        Some("127.0.0.1:8889")
    );
    let [gecho, legacy] = &c.services[..] else {
        panic!("two services: {:?}", c.services);
    };
    assert!(gecho.remote && legacy.remote);
    assert!(gecho.command.is_empty());
    assert_eq!(gecho.service.as_deref(), Some("echo.Echo"));
    assert_eq!(gecho.policy.timeout, Some(Duration::from_millis(200)));
    // Keys a service leaves unset take the defaults for services (retry on connect).
    assert_eq!(gecho.policy.retry, remote_policy().retry);
    assert_eq!(gecho.policy_for("UnaryEcho").retry.unwrap().attempts, 3);
    assert_eq!(legacy.service.as_deref(), Some("LegacyService"));
    assert_eq!(legacy.policy, remote_policy());
    assert_eq!(legacy.scale, remote_scale());
    // No egress: nothing added.
    assert!(!parse(GOOD).unwrap().functions[0]
        .env
        .contains_key("FNMESH_EGRESS"));
}

#[test]
fn bad_egress_and_services_are_refused_by_key_and_line() {
    let with = |extra: &str| GOOD.replacen("drain_timeout", &format!("{extra}\ndrain_timeout"), 1);
    let e = err(&with("egress = \"127.0.0.1:8888\""));
    assert!(
        e.contains("sidecar.egress") && e.contains("already the listen"),
        "{e}"
    );
    let e = err(&with("egress = \"nowhere\""));
    assert!(e.contains("sidecar.egress") && e.contains("ip:port"), "{e}");
    let svc = |body: &str| format!("{GOOD}\n[[service]]\n{body}\n");
    let e = err(&svc("name = \"x\"\nprotocol = \"smtp\""));
    assert!(e.contains("service[x].protocol"), "{e}");
    let e = err(&svc(
        "name = \"x\"\nprotocol = \"grpc\"\ncommand = [\"/bin/true\"]",
    ));
    assert!(e.contains("command"), "a service runs nothing: {e}");
    let e = err(&svc(
        "name = \"x\"\nprotocol = \"grpc\"\nidl = \"idl/proto/echo.proto\"\n[service.method.Nope]\ntimeout = \"1s\"",
    ));
    assert!(e.contains("service[x].method.Nope"), "{e}");
    let twice = format!(
        "{GOOD}\n[[service]]\nname = \"x\"\nprotocol = \"grpc\"\n[[service]]\nname = \"x\"\nprotocol = \"grpc\"\n"
    );
    let e = err(&twice);
    assert!(e.contains("service.name") && e.contains("twice"), "{e}");
}

/// A file with `[async]` and a `types` function (idl/tests/thrift/types.thrift) with `extra` in
/// its table.
fn with_async(queue: &str, extra: &str) -> String {
    format!(
        "[sidecar]\nlisten = \"127.0.0.1:8888\"\n\n{queue}\n\n[[function]]\nname = \"types\"\nprotocol = \"thrift\"\nidl = \"idl/tests/thrift/types.thrift\"\nservice = \"Types\"\ncommand = [\"/bin/true\"]\n{extra}\n"
    )
}

#[test]
fn async_and_triggers_parse_with_their_defaults_and_overrides() {
    let c = parse(&with_async(
        "[async]\nnats = \"127.0.0.1:4222\"\nmax_attempts = 5\nbackoff = \"200ms\"",
        "[function.async]\nconcurrency = 2\n\n[[function.trigger]]\nsubject = \"orders.*.created\"\nmethod = \"Two\"\n\n[[function.trigger]]\nsubject = \"blobs.>\"\nmethod = \"Raw\"\npayload = \"raw\"\nmax_deliver = 7\nbackoff = \"2s\"",
    ))
    .unwrap();
    let q = c.queue.unwrap();
    assert_eq!(q.nats, "nats://127.0.0.1:4222");
    assert_eq!(q.retention, Duration::from_secs(86_400));
    assert_eq!(q.ack_wait, Duration::from_secs(30));
    let f = &c.functions[0];
    let p = f.async_policy;
    assert_eq!((p.concurrency, p.max_attempts), (2, 5));
    assert_eq!(p.backoff, Duration::from_millis(200));
    assert_eq!(p.delay(2), Duration::from_millis(200));
    assert_eq!(p.delay(4), Duration::from_millis(800));
    assert_eq!(
        p.delay(30),
        Duration::from_secs(60),
        "capped at max_backoff"
    );
    let [json, raw] = f.triggers.as_slice() else {
        panic!("two triggers")
    };
    assert_eq!((json.payload, json.policy.max_attempts), (Payload::Json, 5));
    assert_eq!(raw.payload, Payload::Raw);
    assert_eq!(raw.raw_field.as_deref(), Some("data"));
    assert_eq!(raw.policy.max_attempts, 7);
    assert_eq!(raw.policy.backoff, Duration::from_secs(2));
    assert!(parse(GOOD).unwrap().queue.is_none());
}

#[test]
fn bad_async_and_trigger_keys_are_refused_by_key() {
    let nats = "[async]\nnats = \"nats://127.0.0.1:4222\"";
    let trigger = |t: &str| format!("[[function.trigger]]\n{t}");
    let cases: Vec<(String, &[&str])> = vec![
        (
            with_async("", &trigger("subject = \"a\"\nmethod = \"Two\"")),
            &["function[types].async", "needs [async]"],
        ),
        (
            with_async("[async]\nnats = \"http://x:1\"", ""),
            &["async.nats", "not nats://HOST:PORT"],
        ),
        (
            with_async(&format!("{nats}\nmax_attempts = 0"), ""),
            &["async.max_attempts", "not between 1 and 100"],
        ),
        (
            with_async(&format!("{nats}\nbackoff = \"2m\""), ""),
            &["async.backoff", "at most max_backoff"],
        ),
        (
            with_async(nats, &trigger("subject = \"a..b\"\nmethod = \"Two\"")),
            &["trigger[0].subject", "non-empty"],
        ),
        (
            with_async(nats, &trigger("subject = \"a.>.b\"\nmethod = \"Two\"")),
            &["trigger[0].subject", "whole last token"],
        ),
        (
            with_async(nats, &trigger("subject = \"fnmesh.x\"\nmethod = \"Two\"")),
            &["trigger[0].subject", "reserved"],
        ),
        (
            with_async(nats, &trigger("subject = \"a\"\nmethod = \"Nope\"")),
            &["trigger[0].method", "no such method"],
        ),
        (
            with_async(
                nats,
                &trigger("subject = \"a\"\nmethod = \"Two\"\npayload = \"raw\""),
            ),
            &["trigger[0].payload", "only argument is binary"],
        ),
        (
            with_async(
                nats,
                &trigger("subject = \"a\"\nmethod = \"Two\"\npayload = \"xml\""),
            ),
            &["trigger[0].payload", "not one of json, raw"],
        ),
        (
            with_async(
                nats,
                &trigger("subject = \"a\"\nmethod = \"Two\"\nbogus = 1"),
            ),
            &["unknown field `bogus`"],
        ),
    ];
    for (text, needles) in cases {
        let e = err(&text);
        for n in needles {
            assert!(e.contains(n), "{e:?} should contain {n:?}");
        }
    }
}
