//! A new connection: one bounded, timed read phase until the protocol is known, then the
//! connection and the bytes already read go to that protocol's front end.

use std::{sync::Arc, time::Duration};

use bytes::BytesMut;
use fnmesh_codec::{detect, Detected, Detection};
use tokio::{io::AsyncReadExt, net::TcpStream, time::timeout};

use crate::{grpc::GrpcFront, thrift::ThriftFront};

/// How long a new connection may take to send enough bytes to tell its protocol.
const DETECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The front ends a connection can go to.
#[derive(Clone)]
pub struct Fronts {
    pub thrift: Arc<ThriftFront>,
    pub grpc: Arc<GrpcFront>,
}

/// Serves one accepted connection (on a worker thread).
pub async fn connection(mut sock: TcpStream, fronts: Fronts) {
    let peer = sock.peer_addr().ok();
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let detected = timeout(DETECT_TIMEOUT, async {
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
    match detected {
        Ok(Some(Detected::Http2)) => crate::grpc::serve(sock, buf, fronts.grpc).await,
        Ok(Some(d)) => crate::thrift::serve(sock, d, buf, fronts.thrift).await,
        Ok(None) if buf.is_empty() => {}
        Ok(None) => {
            let first = &buf[..buf.len().min(8)];
            tracing::warn!(?peer, first_bytes = ?first, "not a protocol fnmesh speaks; closing the connection");
        }
        Err(_) => tracing::debug!(
            ?peer,
            "no protocol detected within 10 s; closing the connection"
        ),
    }
}
