//! A thin HTTP/1.1 client over hyper for registry APIs (Consul's agent API, etcd's JSON
//! gateway): one request per connection (these are a few requests per TTL, not a data path),
//! bounded by a timeout; or a response body read as it streams (etcd watches).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::Error;

/// An HTTP server at `authority` (`host:port`).
#[derive(Debug, Clone)]
pub struct Http {
    pub registry: &'static str,
    pub authority: String,
    /// Sent with every request (Consul's `X-Consul-Token`).
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// The largest response body read whole: a registry (or something posing as one) that sends
/// more gets an error, not the sidecar's memory.
pub const MAX_BODY: usize = 16 << 20;

/// A response: status, headers, body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Http {
    /// `base` is `http://host:port` (a trailing `/` is fine); `https` is not supported.
    pub fn new(registry: &'static str, base: &str) -> Result<Http, String> {
        let rest = base
            .strip_prefix("http://")
            .ok_or_else(|| format!("{base:?}: only http:// addresses are supported"))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(format!("{base:?}: expected http://host:port"));
        }
        Ok(Http {
            registry,
            authority: authority.to_owned(),
            headers: Vec::new(),
        })
    }

    fn unreachable(&self, detail: impl std::fmt::Display) -> Error {
        Error::Unreachable {
            registry: self.registry,
            detail: format!("{}: {detail}", self.authority),
        }
    }

    /// Sends one request and reads the whole answer within `within`.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        within: Duration,
    ) -> Result<Answer, Error> {
        tokio::time::timeout(within, self.exchange(method, path, body))
            .await
            .map_err(|_| self.unreachable(format!("no answer within {within:?}")))?
    }

    /// Sends one request and gives the answer's status and its body as it arrives (the
    /// connection stays open while the body is read); the head must come within `within`.
    pub async fn open(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        within: Duration,
    ) -> Result<(StatusCode, hyper::body::Incoming), Error> {
        let resp = tokio::time::timeout(within, self.request(method, path, body))
            .await
            .map_err(|_| self.unreachable(format!("no answer within {within:?}")))??;
        Ok((resp.status(), resp.into_body()))
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, Error> {
        let resp = self.request(method, path, body).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| self.unreachable(format!("reading the response: {e}")))?
            .to_bytes();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<http::Response<hyper::body::Incoming>, Error> {
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(|e| self.unreachable(e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.authority);
        for (name, value) in &self.headers {
            req = req.header(name, value);
        }
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Error::Refused {
                registry: self.registry,
                detail: format!("cannot build the request for {path}: {e}"),
            })?;
        sender
            .send_request(req)
            .await
            .map_err(|e| self.unreachable(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_http_host_port() {
        assert_eq!(
            Http::new("consul", "http://127.0.0.1:8500/")
                .unwrap()
                .authority,
            "127.0.0.1:8500"
        );
        assert!(Http::new("consul", "https://127.0.0.1:8500")
            .unwrap_err()
            .contains("only http://"));
        assert!(Http::new("consul", "http://host:1/v1").is_err());
    }

    /// A response body past [`MAX_BODY`] is an error, read no further.
    #[tokio::test]
    async fn a_response_body_past_the_cap_is_an_error() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s.read(&mut [0u8; 4096]).await;
            let total = 64usize << 20;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\n\r\n");
            let _ = s.write_all(head.as_bytes()).await;
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..64 {
                if s.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let http = Http::new("consul", &format!("http://{addr}")).unwrap();
        let got = http
            .send(Method::GET, "/v1/agent/self", None, Duration::from_secs(10))
            .await;
        let Err(e) = got else {
            panic!("a 64 MiB body was read whole")
        };
        assert!(e.to_string().contains("length limit"), "{e}");
    }
}
