//! `X-Callback-Url`: an ended async call's result (or error) POSTed as JSON, with OpenFaaS's
//! headers. One try, within 10 s; http:// only.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

pub(crate) async fn post(
    url: &str,
    id: &str,
    function: &str,
    status: http::StatusCode,
    duration: Duration,
    body: &Value,
) {
    let sent = tokio::time::timeout(
        Duration::from_secs(10),
        send(url, id, function, status, duration, body),
    )
    .await
    .unwrap_or_else(|_| Err("no answer within 10s".into()));
    if let Err(e) = sent {
        tracing::warn!(call = %id, %url, error = %e, "the callback failed");
    }
}

async fn send(
    url: &str,
    id: &str,
    function: &str,
    status: http::StatusCode,
    duration: Duration,
    body: &Value,
) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// callbacks are supported".into());
    }
    let host = uri.host().ok_or("no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let sock = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| e.to_string())?;
    let io = hyper_util::rt::TokioIo::new(sock);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = http::Request::post(path)
        .header(
            http::header::HOST,
            uri.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .header(http::header::CONTENT_TYPE, "application/json")
        .header("X-Call-Id", id)
        .header("X-Function-Name", function)
        .header("X-Function-Status", status.as_u16().to_string())
        .header(
            "X-Duration-Seconds",
            format!("{:.6}", duration.as_secs_f64()),
        )
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let code = response.status();
    let _ = response.into_body().collect().await;
    match code.is_success() {
        true => Ok(()),
        false => Err(format!("the callback answered {code}")),
    }
}
