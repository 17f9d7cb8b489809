//! A new connection: one bounded, timed read phase until the protocol is known, then the
//! connection and the bytes already read go to that protocol's front end.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use bytes::BytesMut;
use fnmesh_codec::{detect, Detected, Detection};
use tokio::{io::AsyncReadExt, net::TcpStream, time::timeout};

use crate::{grpc::GrpcFront, thrift::ThriftFront, workers::Listener};

/// The front ends a connection can go to, and the count of open caller connections.
#[derive(Clone)]
pub struct Fronts {
    pub thrift: Arc<ThriftFront>,
    pub grpc: Arc<GrpcFront>,
    /// The egress listener's, when there is one.
    pub egress: Option<(Arc<ThriftFront>, Arc<GrpcFront>)>,
    /// The main listener's address as this host reaches it: the gateway calls gRPC functions
    /// through it.
    pub own: std::net::SocketAddr,
    pub open: Arc<AtomicUsize>,
    /// `/async/...` (with `[async]`).
    pub queue: Option<crate::thrift::http::AsyncRoutes>,
}

/// Gives back a connection's place in the count (taken at accept) when it ends.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes a place for a new connection, unless `max` are open.
pub fn admit(open: &AtomicUsize, max: usize) -> bool {
    open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
        (n < max).then_some(n + 1)
    })
    .is_ok()
}

/// Serves one accepted connection (on a worker thread); its place was taken by [`admit`].
pub async fn connection(mut sock: TcpStream, listener: Listener, fronts: Fronts) {
    let _open = Open(fronts.open.clone());
    let (thrift, grpc) = match (listener, fronts.egress) {
        (Listener::Egress, Some(egress)) => egress,
        _ => (fronts.thrift, fronts.grpc),
    };
    let peer = sock.peer_addr().ok();
    let mut buf = BytesMut::with_capacity(8 * 1024);
    // A new connection has `header_timeout` to send enough bytes to tell its protocol.
    let within = thrift.connections.header_timeout;
    let detected = timeout(within, async {
        loop {
            match detect(&buf) {
                Detection::Found(d) => return Some(d),
                Detection::Unknown => return None,
                Detection::NeedMore(_) => match sock.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                },
            }
        }
    })
    .await;
    use crate::metrics::{Connection, GRPC_CONNECTIONS, THRIFT_CONNECTIONS};
    match detected {
        Ok(Some(Detected::Http1)) => {
            let gateway = grpc_gateway(grpc, fronts.own);
            crate::thrift::http::serve(sock, buf, thrift, Some(gateway), fronts.queue.clone()).await
        }
        Ok(Some(Detected::Http2)) => {
            let _counted = Connection::open(&GRPC_CONNECTIONS);
            crate::grpc::serve(sock, buf, grpc).await
        }
        Ok(Some(d)) => {
            let _counted = Connection::open(&THRIFT_CONNECTIONS);
            crate::thrift::serve(sock, d, buf, thrift).await
        }
        Ok(None) if buf.is_empty() => {}
        Ok(None) => {
            let first = &buf[..buf.len().min(8)];
            tracing::warn!(?peer, first_bytes = ?first, "not a protocol fnmesh speaks; closing the connection");
        }
        Err(_) => tracing::debug!(
            ?peer,
            "no protocol detected within header_timeout; closing the connection"
        ),
    }
}

/// How JSON calls find gRPC functions (in `grpc`'s table) and reach them (through `own`).
pub fn grpc_gateway(
    grpc: Arc<GrpcFront>,
    own: std::net::SocketAddr,
) -> crate::thrift::json_call::GrpcGateway {
    crate::thrift::json_call::GrpcGateway {
        lookup: Arc::new(move |name: &str| {
            let table = grpc.functions.load();
            let c = table
                .iter()
                .find(|r| r.function.name == name)?
                .function
                .config();
            Some(crate::thrift::json_call::GrpcTarget {
                proto: c.proto.clone()?,
                service: c.service.clone()?,
            })
        }),
        own,
    }
}
