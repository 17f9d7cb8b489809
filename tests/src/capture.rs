//! A Thrift listener that decodes every request with fnmesh's codec, hands the decoded frames to
//! the test, and answers each with a TApplicationException encoded by fnmesh's codec.

use std::net::SocketAddr;

use bytes::BytesMut;
use fnmesh_codec::{encode_exception, ExceptionType, Frame, FrameDecoder, Limits, ReplyTarget};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::mpsc,
};

/// The exception every captured request is answered with.
#[derive(Debug, Clone)]
pub struct CannedReply {
    pub ty: ExceptionType,
    pub message: String,
    pub kind: String,
}

/// A running capture listener; it stops when dropped (its task ends with the runtime).
pub struct Capture {
    pub addr: SocketAddr,
    frames: mpsc::UnboundedReceiver<Frame>,
}

impl Capture {
    /// Binds 127.0.0.1 on a free port and serves until the test's runtime ends.
    pub async fn start(reply: CannedReply) -> std::io::Result<Capture> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, frames) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, reply.clone(), tx.clone()));
            }
        });
        Ok(Capture { addr, frames })
    }

    /// The next request the listener decoded.
    pub async fn next(&mut self) -> Option<Frame> {
        self.frames.recv().await
    }
}

async fn serve(
    mut sock: tokio::net::TcpStream,
    reply: CannedReply,
    tx: mpsc::UnboundedSender<Frame>,
) {
    let mut decoder = FrameDecoder::new(Limits::default());
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let target = ReplyTarget::of(&frame);
                    let bytes =
                        encode_exception(&target, reply.ty, &reply.message, Some(&reply.kind))
                            .expect("reply encodes");
                    if sock.write_all(&bytes).await.is_err() {
                        return;
                    }
                    let _ = tx.send(frame);
                }
                Ok(None) => break,
                Err(e) => panic!("capture listener could not decode a real client's bytes: {e}"),
            }
        }
        match sock.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
