//! The example echo function: a plain Volo Thrift server on 127.0.0.1:$PORT (default 8083), or
//! on the Unix socket $FNMESH_SOCKET when that is set. It knows nothing of fnmesh; FNMESH_INSTANCE, when set, is echoed back so tests can tell
//! instances apart.
#![forbid(unsafe_code)]

use fnmesh_tests::{
    echo::{closing_front, EchoHandler, SeenTimeout},
    gen::volo_gen::echo::EchoServiceServer,
};
use volo::net::incoming::DefaultIncoming;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let incoming = match fnmesh_tests::echo::unix_listener("echo-fn") {
        Some(unix) => DefaultIncoming::from(unix),
        None => DefaultIncoming::from(tcp_listener().await),
    };
    let server = EchoServiceServer::new(EchoHandler::from_env())
        .layer_front(SeenTimeout)
        .run(incoming);
    if let Err(e) = server.await {
        eprintln!("echo-fn: {e}");
        std::process::exit(1);
    }
}

/// 127.0.0.1:$PORT (or $ECHO_FN_HOST:$PORT, for a plain server other hosts reach); with
/// ECHO_FN_CLOSE_HOOK, a front there that closes connections on a hook.
async fn tcp_listener() -> tokio::net::TcpListener {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8083);
    let host = std::env::var("ECHO_FN_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let mut listener = tokio::net::TcpListener::bind((host.as_str(), port))
        .await
        .unwrap_or_else(|e| panic!("echo-fn: cannot listen on {host}:{port}: {e}"));
    if std::env::var_os("ECHO_FN_CLOSE_HOOK").is_some() {
        let inner = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("echo-fn: cannot listen for the close hook's front");
        let addr = inner.local_addr().expect("a bound address");
        let outer = std::mem::replace(&mut listener, inner);
        tokio::spawn(closing_front(outer, addr));
    }
    listener
}
