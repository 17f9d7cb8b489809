//! The example gRPC function: a plain volo-grpc `echo.Echo` server on 127.0.0.1:$PORT (default
//! 8084), or on the Unix socket $FNMESH_SOCKET when that is set. It knows nothing of fnmesh; FNMESH_INSTANCE, when set, is echoed back so tests can tell
//! instances apart. GRPC_ECHO_MAX_STREAMS and GRPC_ECHO_MAX_HEADER_LIST, when set, are the
//! SETTINGS_MAX_CONCURRENT_STREAMS and SETTINGS_MAX_HEADER_LIST_SIZE it announces.
#![forbid(unsafe_code)]

use fnmesh_tests::{grpc_echo::GrpcEcho, proto::proto_gen::echo::EchoServer};
use volo::net::incoming::DefaultIncoming;
use volo_grpc::server::{Server, ServiceBuilder};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let incoming = match fnmesh_tests::echo::unix_listener("grpc-echo-fn") {
        Some(unix) => DefaultIncoming::from(unix),
        None => {
            let port: u16 = std::env::var("PORT")
                .ok()
                .and_then(|p| p.parse().ok())
                .unwrap_or(8084);
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap_or_else(|e| panic!("grpc-echo-fn: cannot listen on 127.0.0.1:{port}: {e}"));
            DefaultIncoming::from(listener)
        }
    };
    // Test knobs: the HTTP/2 limits the server announces.
    let setting = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    let mut server = Server::new();
    if let Some(n) = setting("GRPC_ECHO_MAX_STREAMS") {
        server = server.http2_max_concurrent_streams(n);
    }
    if let Some(n) = setting("GRPC_ECHO_MAX_HEADER_LIST") {
        server = server.http2_max_header_list_size(n);
    }
    let server = server
        .add_service(ServiceBuilder::new(EchoServer::new(GrpcEcho::from_env())).build())
        .run(incoming);
    if let Err(e) = server.await {
        eprintln!("grpc-echo-fn: {e}");
        std::process::exit(1);
    }
}
