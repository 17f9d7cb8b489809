//! The example echo function: a plain Volo Thrift server on 127.0.0.1:$PORT (default 8083). It
//! knows nothing of fnmesh; FNMESH_INSTANCE, when set, is echoed back so tests can tell
//! instances apart.
#![forbid(unsafe_code)]

use fnmesh_tests::{
    echo::{EchoHandler, SeenTimeout},
    gen::volo_gen::echo::EchoServiceServer,
};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8083);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("echo-fn: cannot listen on 127.0.0.1:{port}: {e}"));
    let server = EchoServiceServer::new(EchoHandler::from_env())
        .layer_front(SeenTimeout)
        .run(volo::net::incoming::DefaultIncoming::from(listener));
    if let Err(e) = server.await {
        eprintln!("echo-fn: {e}");
        std::process::exit(1);
    }
}
