//! A thin HTTP/1.1 client over hyper for registry APIs (Consul's agent API, etcd's JSON
//! gateway), over TCP or TLS (rustls): one request per connection (these are a few requests per
//! TTL, not a data path), bounded by a timeout; or a response body read as it streams (etcd
//! watches).

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use crate::Error;

/// TLS to a registry (`https://` addresses): the CA certificates that sign its certificate (PEM;
/// without one, the system's bundle), and a client certificate and key (PEM) when it asks for
/// one (etcd's `--client-cert-auth`, Consul's `verify_incoming`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// Where Debian, Alpine and Red Hat keep the system's CA bundle.
const SYSTEM_BUNDLES: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

impl Tls {
    /// The client configuration these files make; every file is read now, so a missing or bad
    /// one is an error at start, naming it.
    fn connector(&self) -> Result<tokio_rustls::TlsConnector, String> {
        let ca = match &self.ca_file {
            Some(f) => f.clone(),
            None => std::env::var_os("SSL_CERT_FILE")
                .map(PathBuf::from)
                .or_else(|| {
                    SYSTEM_BUNDLES
                        .iter()
                        .map(PathBuf::from)
                        .find(|p| p.is_file())
                })
                .ok_or("https:// needs ca_file: no system CA bundle found")?,
        };
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(&ca)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", ca.display()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!("{}: no CA certificate in it", ca.display()));
        }
        // ring, not aws-lc-rs: ring is already in the build (hickory) and aws-lc-rs would add a
        // C and CMake build; the ring provider lacks only post-quantum key exchange, which Consul
        // and etcd (Go) do not need for X25519.
        #[allow(deprecated)]
        let provider = rustls::crypto::ring::default_provider();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match (&self.cert_file, &self.key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("{}: {e}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("{}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("the client certificate and key: {e}"))?
            }
            _ => return Err("cert_file and key_file go together".into()),
        };
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }
}

/// An HTTP server at `authority` (`host:port`), over TLS when `tls` is set.
#[derive(Clone)]
pub struct Http {
    pub registry: &'static str,
    pub authority: String,
    /// Sent with every request (Consul's `X-Consul-Token`).
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http")
            .field("registry", &self.registry)
            .field("authority", &self.authority)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
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
    /// `base` is `http://host:port` or `https://host:port` (a trailing `/` is fine); `tls`
    /// says how to trust an `https` one, and must be empty for `http`.
    pub fn new(registry: &'static str, base: &str, tls: &Tls) -> Result<Http, String> {
        let (https, rest) = match (base.strip_prefix("http://"), base.strip_prefix("https://")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => return Err(format!("{base:?}: expected http:// or https://")),
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(format!(
                "{base:?}: expected http://host:port or https://host:port"
            ));
        }
        if !https && *tls != Tls::default() {
            return Err(format!(
                "{base:?}: TLS files are given for an http:// address; use https://"
            ));
        }
        let tls = match https {
            false => None,
            true => Some((tls.connector()?, server_name(authority)?)),
        };
        Ok(Http {
            registry,
            authority: authority.to_owned(),
            headers: Vec::new(),
            tls,
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
        let mut sender = match &self.tls {
            None => self.handshake(stream).await?,
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), stream)
                    .await
                    .map_err(|e| self.unreachable(format!("TLS: {e}")))?;
                self.handshake(stream).await?
            }
        };
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
            .map_err(|e| self.unreachable(with_causes(&e)))
    }
}

/// An error and its causes: hyper's own message ("connection error") hides what went wrong,
/// such as the TLS alert of a registry that wanted a client certificate.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// The name the registry's certificate must carry: the address's host (a DNS name or an IP).
fn server_name(authority: &str) -> Result<ServerName<'static>, String> {
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    ServerName::try_from(host.to_owned()).map_err(|e| format!("{host:?}: {e}"))
}

impl Http {
    /// An HTTP/1.1 connection on `stream`, driven by its own task.
    async fn handshake<S>(
        &self,
        stream: S,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(with_causes(&e)))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_http_host_port() {
        let none = Tls::default();
        assert_eq!(
            Http::new("consul", "http://127.0.0.1:8500/", &none)
                .unwrap()
                .authority,
            "127.0.0.1:8500"
        );
        assert!(Http::new("consul", "ftp://127.0.0.1:8500", &none)
            .unwrap_err()
            .contains("expected http:// or https://"));
        assert!(Http::new("consul", "http://host:1/v1", &none).is_err());
        let ca = Tls {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Tls::default()
        };
        assert!(Http::new("consul", "http://127.0.0.1:8500", &ca)
            .unwrap_err()
            .contains("use https://"));
        assert!(Http::new("consul", "https://127.0.0.1:8500", &ca)
            .unwrap_err()
            .contains("/nonexistent/ca.pem"));
        let half = Tls {
            cert_file: Some("/nonexistent/c.pem".into()),
            ..Tls::default()
        };
        assert!(Http::new("etcd", "https://127.0.0.1:2379", &half).is_err());
        assert_eq!(
            server_name("[::1]:2379").unwrap(),
            ServerName::try_from("::1").unwrap()
        );
        assert_eq!(
            server_name("etcd.internal:2379").unwrap(),
            ServerName::try_from("etcd.internal").unwrap()
        );
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
        let http = Http::new("consul", &format!("http://{addr}"), &Tls::default()).unwrap();
        let got = http
            .send(Method::GET, "/v1/agent/self", None, Duration::from_secs(10))
            .await;
        let Err(e) = got else {
            panic!("a 64 MiB body was read whole")
        };
        assert!(e.to_string().contains("length limit"), "{e}");
    }
}
