//! The leanest TCP proxy tokio allows, laid out as fnmesh's workers are (a thread per core, each
//! with its own single-threaded runtime, serving whole connections): each caller connection
//! gets its own connection to the backend, and bytes are copied both ways as they come
//! (`copy_bidirectional`), with no decoding, routing or governance. The benchmarks run it
//! beside fnmesh and haproxy as the floor of what any proxy on this runtime costs.
//!
//! usage: copy-proxy LISTEN BACKEND [WORKERS (default: one per CPU)]
#![forbid(unsafe_code)]

use std::net::{SocketAddr, TcpListener};

use tokio::{net::TcpStream, sync::mpsc};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut addr = || -> SocketAddr {
        args.next()
            .and_then(|a| a.parse().ok())
            .expect("usage: copy-proxy LISTEN BACKEND [WORKERS]")
    };
    let (listen, backend) = (addr(), addr());
    let workers = args
        .next()
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let listener = TcpListener::bind(listen).expect("bind LISTEN");
    let senders: Vec<_> = (0..workers).map(|_| worker(backend)).collect();
    for (i, conn) in listener.incoming().flatten().enumerate() {
        if conn.set_nonblocking(true).is_ok() {
            let _ = senders[i % workers].send(conn);
        }
    }
}

/// A worker thread serving the connections sent to it.
fn worker(backend: SocketAddr) -> mpsc::UnboundedSender<std::net::TcpStream> {
    let (tx, mut rx) = mpsc::unbounded_channel::<std::net::TcpStream>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("a runtime");
    std::thread::spawn(move || {
        runtime.block_on(async move {
            while let Some(conn) = rx.recv().await {
                tokio::spawn(async move {
                    let Ok(mut caller) = TcpStream::from_std(conn) else {
                        return;
                    };
                    let Ok(mut upstream) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = caller.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut caller, &mut upstream).await;
                });
            }
        })
    });
    tx
}
