//! `fnmesh status`: what a running sidecar is doing, read from its admin API
//! (`/admin/functions`), as a table a person reads at a glance or as JSON.

use std::{io::IsTerminal, net::SocketAddr, process::ExitCode, time::Duration};

use serde_json::Value;

/// Prints the status of the sidecar at `admin` once, or every 2 s with `watch`.
pub fn main(admin: SocketAddr, watch: bool, as_json: bool) -> ExitCode {
    loop {
        let status = match fetch(admin) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("fnmesh: cannot read the sidecar's status at {admin}: {e}");
                return ExitCode::from(1);
            }
        };
        if watch && std::io::stdout().is_terminal() {
            print!("\x1b[H\x1b[2J");
        }
        match as_json {
            true => println!(
                "{}",
                serde_json::to_string_pretty(&status).unwrap_or_default()
            ),
            false => print!("{}", table(&status)),
        }
        if !watch {
            return ExitCode::SUCCESS;
        }
        println!();
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// `GET /admin/functions`, parsed. One blocking request over std's TCP.
fn fetch(admin: SocketAddr) -> Result<Value, String> {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(5);
    let mut s = std::net::TcpStream::connect_timeout(&admin, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET /admin/functions HTTP/1.1\r\nhost: {admin}\r\nconnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    if head.split_whitespace().nth(1) != Some("200") {
        return Err(head.lines().next().unwrap_or("no answer").to_owned());
    }
    serde_json::from_str(body).map_err(|e| format!("not the admin API's JSON: {e}"))
}

/// The status as a table: a row per function, then the registry.
pub fn table(status: &Value) -> String {
    let header = [
        "FUNCTION",
        "READY/STARTING/MAX",
        "IN FLIGHT",
        "QUEUED",
        "CALLS/S",
        "P50",
        "P99",
        "SUCCESS",
        "BREAKERS",
        "LAST COLD START",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    for f in status["functions"].as_array().into_iter().flatten() {
        rows.push(row(f));
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    let registry = match &status["registry"] {
        Value::Null => "none".to_owned(),
        r => format!(
            "{} {}",
            r["backend"].as_str().unwrap_or("?"),
            r["state"].as_str().unwrap_or("?")
        ),
    };
    out.push_str(&format!("registry: {registry}\n"));
    let peers: Vec<String> = status["functions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["peers"].is_object())
        .map(|f| {
            let p = &f["peers"];
            format!(
                "{} ({} nodes, {} in flight)",
                f["name"].as_str().unwrap_or("?"),
                p["nodes"],
                p["in_flight"]
            )
        })
        .collect();
    if !peers.is_empty() {
        out.push_str(&format!("peers: {}\n", peers.join(", ")));
    }
    let services: Vec<String> = status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            format!(
                "{} ({} endpoints, {} in flight, {} queued)",
                s["name"].as_str().unwrap_or("?"),
                s["endpoints"],
                s["in_flight"],
                s["queued"]
            )
        })
        .collect();
    if !services.is_empty() {
        out.push_str(&format!("egress services: {}\n", services.join(", ")));
    }
    out
}

/// One function's row.
fn row(f: &Value) -> Vec<String> {
    let n = |v: &Value| v.as_u64().map_or("-".into(), |n| n.to_string());
    let w = &f["last_minute"];
    let ms = |v: &Value| v.as_f64().map_or("-".into(), |ms| format!("{ms:.2}ms"));
    let breakers: Vec<String> = f["breakers"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(m, s)| format!("{m}={}", s.as_str().unwrap_or("?")))
        .collect();
    let cold = &f["last_cold_start"];
    vec![
        f["name"].as_str().unwrap_or("?").to_owned(),
        format!("{}/{}/{}", n(&f["ready"]), n(&f["starting"]), n(&f["max"])),
        n(&f["in_flight"]),
        n(&f["queued"]),
        w["per_second"]
            .as_f64()
            .map_or("-".into(), |r| format!("{r:.1}")),
        ms(&w["p50_ms"]),
        ms(&w["p99_ms"]),
        w["success_rate"]
            .as_f64()
            .map_or("-".into(), |r| format!("{:.1}%", r * 100.0)),
        if breakers.is_empty() {
            "-".into()
        } else {
            breakers.join(",")
        },
        match (cold["ms"].as_f64(), cold["seconds_ago"].as_f64()) {
            (Some(ms), Some(ago)) => format!("{ms:.1}ms, {ago:.0}s ago"),
            _ => "-".into(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn peers_and_egress_services_follow_the_functions() {
        let status = json!({
            "functions": [
                {"name": "echo", "ready": 1, "starting": 0, "max": 8, "in_flight": 0, "queued": 0,
                 "peers": {"nodes": 2, "in_flight": 3}},
                {"name": "solo", "ready": 0, "starting": 0, "max": 8, "in_flight": 0, "queued": 0,
                 "peers": null},
            ],
            "services": [{"name": "payments", "endpoints": 3, "in_flight": 1, "queued": 0}],
            "registry": {"backend": "consul", "state": "registered"},
        });
        let t = super::table(&status);
        assert!(t.contains("registry: consul registered\npeers: echo (2 nodes, 3 in flight)\negress services: payments (3 endpoints, 1 in flight, 0 queued)\n"), "{t}");
        let bare = super::table(&json!({"functions": [], "registry": null}));
        assert_eq!(bare.lines().last(), Some("registry: none"));
    }
}
