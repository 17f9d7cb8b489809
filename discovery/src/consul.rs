//! Consul, through the local agent's HTTP API: a service per function (ID `{name}:{host}:{port}`)
//! with a TTL check that the sidecar keeps passing. The agent, not the catalog, owns the
//! registration: catalog writes would be undone by the agent's anti-entropy.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use futures_util::Stream;
use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::{
    http::{Http, Tls},
    Endpoint, Error, Registration, Registry, Resolver, Service as Listed,
};

const NAME: &str = "consul";
/// How long one request may take (blocking queries add their `wait`).
const REQUEST: Duration = Duration::from_secs(5);
/// How long a blocking query waits for a change.
const WAIT: Duration = Duration::from_secs(30);

/// A Consul agent at `http://host:port` or `https://host:port`.
#[derive(Debug, Clone)]
pub struct Consul {
    http: Http,
}

impl Consul {
    pub fn new(address: &str, tls: &Tls) -> Result<Consul, String> {
        Ok(Consul {
            http: Http::new(NAME, address, tls)?,
        })
    }

    /// The same agent, with an ACL token sent in `X-Consul-Token` on every request (as Consul's
    /// own tools send `CONSUL_HTTP_TOKEN`).
    pub fn with_token(mut self, token: &str) -> Result<Consul, String> {
        let mut value = http::HeaderValue::from_str(token)
            .map_err(|_| "the ACL token is not a valid HTTP header value".to_owned())?;
        value.set_sensitive(true);
        self.http
            .headers
            .push((http::HeaderName::from_static("x-consul-token"), value));
        Ok(self)
    }

    fn check_id(r: &Registration) -> String {
        format!("fnmesh:{}", r.id())
    }

    fn refused(detail: String) -> Error {
        Error::Refused {
            registry: NAME,
            detail,
        }
    }

    /// The agent's `PUT /v1/agent/service/register` body for `r`.
    pub fn service_definition(r: &Registration, ttl: Duration) -> serde_json::Value {
        let tags: Vec<String> = r.tags().iter().map(|(k, v)| format!("{k}:{v}")).collect();
        // Meta values are limited to 512 characters by Consul: a longer method list is left out
        // of Meta (the tag carries it).
        let meta: BTreeMap<String, String> = r
            .tags()
            .into_iter()
            .filter(|(_, v)| v.len() <= 512)
            .collect();
        json!({
            "ID": r.id(),
            "Name": r.name,
            "Address": r.address.ip().to_string(),
            "Port": r.address.port(),
            "Tags": tags,
            "Meta": meta,
            "Weights": { "Passing": r.weight, "Warning": 1 },
            "Check": {
                "CheckID": Self::check_id(r),
                "Name": "fnmesh sidecar TTL",
                "TTL": format!("{}s", ttl.as_secs().max(1)),
                "Status": "passing",
                "DeregisterCriticalServiceAfter": "1m",
            },
        })
    }
}

impl Registry for Consul {
    async fn register(&self, r: &Registration, ttl: Duration) -> Result<(), Error> {
        let body = serde_json::to_vec(&Self::service_definition(r, ttl))
            .map_err(|e| Self::refused(e.to_string()))?;
        let a = self
            .http
            .send(
                Method::PUT,
                "/v1/agent/service/register",
                Some(body),
                REQUEST,
            )
            .await?;
        if a.status != StatusCode::OK {
            return Err(Self::refused(format!(
                "registering {}: {} {}",
                r.id(),
                a.status,
                String::from_utf8_lossy(&a.body).trim()
            )));
        }
        Ok(())
    }

    async fn renew(&self, r: &Registration) -> Result<(), Error> {
        let path = format!("/v1/agent/check/update/{}", Self::check_id(r));
        let body = br#"{"Status":"passing","Output":"fnmesh sidecar serving"}"#.to_vec();
        let a = self
            .http
            .send(Method::PUT, &path, Some(body), REQUEST)
            .await?;
        match a.status {
            StatusCode::OK => Ok(()),
            // The agent forgot the check: it restarted, or reaped the service.
            s if s.is_client_error() || s == StatusCode::INTERNAL_SERVER_ERROR => {
                Err(Error::Lost {
                    registry: NAME,
                    detail: format!(
                        "check {}: {s} {}",
                        Self::check_id(r),
                        String::from_utf8_lossy(&a.body).trim()
                    ),
                })
            }
            s => Err(Self::refused(format!("check {}: {s}", Self::check_id(r)))),
        }
    }

    async fn deregister(&self, r: &Registration) -> Result<(), Error> {
        let path = format!("/v1/agent/service/deregister/{}", r.id());
        let a = self.http.send(Method::PUT, &path, None, REQUEST).await?;
        if a.status != StatusCode::OK && a.status != StatusCode::NOT_FOUND {
            return Err(Self::refused(format!(
                "deregistering {}: {}",
                r.id(),
                a.status
            )));
        }
        Ok(())
    }
}

/// One entry of `/v1/health/service/{name}`.
#[derive(Deserialize)]
struct HealthEntry {
    #[serde(rename = "Node")]
    node: Node,
    #[serde(rename = "Service")]
    service: Service,
}

#[derive(Deserialize)]
struct Node {
    #[serde(rename = "Address")]
    address: String,
}

#[derive(Deserialize)]
struct Service {
    #[serde(rename = "Address")]
    address: String,
    #[serde(rename = "Port")]
    port: u16,
    #[serde(rename = "Tags", default)]
    tags: Option<Vec<String>>,
    #[serde(rename = "Weights", default)]
    weights: Option<Weights>,
}

#[derive(Deserialize)]
struct Weights {
    #[serde(rename = "Passing")]
    passing: u32,
}

/// Endpoints from a health query's body (entries whose address does not parse are skipped).
pub fn endpoints(body: &[u8]) -> Result<Vec<Endpoint>, Error> {
    let entries: Vec<HealthEntry> = serde_json::from_slice(body).map_err(|e| Error::Refused {
        registry: NAME,
        detail: format!("unreadable health answer: {e}"),
    })?;
    let mut out: Vec<Endpoint> = entries
        .into_iter()
        .filter_map(|e| {
            let host = if e.service.address.is_empty() {
                e.node.address
            } else {
                e.service.address
            };
            let ip = host.parse().ok()?;
            let tags = e
                .service
                .tags
                .unwrap_or_default()
                .into_iter()
                .filter_map(|t| t.split_once(':').map(|(k, v)| (k.to_owned(), v.to_owned())))
                .collect();
            Some(Endpoint {
                address: SocketAddr::new(ip, e.service.port),
                weight: e.service.weights.map_or(1, |w| w.passing),
                tags,
            })
        })
        .collect();
    out.sort_by_key(|e| e.address);
    Ok(out)
}

impl Consul {
    /// Blocking queries of `path` (which has a query string): each answer whose index moved
    /// is read by `read` and yielded.
    fn follow<T: Send + 'static>(
        &self,
        path: String,
        read: fn(&[u8]) -> Result<T, Error>,
    ) -> impl Stream<Item = Result<T, Error>> + Send + 'static {
        let http = self.http.clone();
        futures_util::stream::unfold((0u64, false), move |(index, failing)| {
            let (http, path) = (http.clone(), path.clone());
            async move {
                if failing {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                loop {
                    let path = format!("{path}&index={index}&wait={}s", WAIT.as_secs());
                    let a = match http.send(Method::GET, &path, None, REQUEST + WAIT).await {
                        Ok(a) => a,
                        Err(e) => return Some((Err(e), (0, true))),
                    };
                    if a.status != StatusCode::OK {
                        let e = Consul::refused(format!("{path}: {}", a.status));
                        return Some((Err(e), (0, true)));
                    }
                    let next = a
                        .headers
                        .get("x-consul-index")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                    // The index went back (the agent restarted): start over. It stayed (the wait
                    // ran out): ask again.
                    if next == index && index != 0 && !failing {
                        continue;
                    }
                    let next = if next < index { 0 } else { next };
                    return Some((read(&a.body), (next, false)));
                }
            }
        })
    }
}

/// Services from a catalog query's body (`{name: [tags]}`), with the `idl_service:` tag's value.
pub fn services(body: &[u8]) -> Result<Vec<Listed>, Error> {
    let listed: BTreeMap<String, Option<Vec<String>>> =
        serde_json::from_slice(body).map_err(|e| Error::Refused {
            registry: NAME,
            detail: format!("unreadable catalog answer: {e}"),
        })?;
    Ok(crate::services(listed.into_iter().map(|(name, tags)| {
        let idl = tags
            .unwrap_or_default()
            .iter()
            .find_map(|t| t.strip_prefix("idl_service:").map(str::to_owned));
        (name, idl)
    })))
}

impl Resolver for Consul {
    /// Blocking queries of the passing instances.
    fn resolve(
        &self,
        name: &str,
    ) -> impl Stream<Item = Result<Vec<Endpoint>, Error>> + Send + 'static {
        self.follow(format!("/v1/health/service/{name}?passing=true"), endpoints)
    }

    /// Blocking queries of the catalog's services.
    fn services(&self) -> impl Stream<Item = Result<Vec<Listed>, Error>> + Send + 'static {
        self.follow("/v1/catalog/services?stale=false".to_owned(), services)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_services_carry_their_idl_service() {
        let body = br#"{"consul": [], "echo": ["protocol:thrift", "idl_service:EchoService"], "plain": null}"#;
        let got = services(body).unwrap();
        let pairs: Vec<(&str, Option<&str>)> = got
            .iter()
            .map(|s| (s.name.as_str(), s.idl_service.as_deref()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("consul", None),
                ("echo", Some("EchoService")),
                ("plain", None)
            ]
        );
        assert!(services(b"[1]").is_err());
    }

    fn registration() -> Registration {
        Registration {
            name: "echo".into(),
            address: "127.0.0.1:8888".parse().unwrap(),
            protocol: "thrift".into(),
            idl_service: Some("EchoService".into()),
            methods: vec!["Echo".into(), "Ping".into()],
            weight: 10,
        }
    }

    #[test]
    fn the_service_definition_is_the_documented_one() {
        let d = Consul::service_definition(&registration(), Duration::from_secs(10));
        assert_eq!(
            d,
            json!({
                "ID": "echo:127.0.0.1:8888",
                "Name": "echo",
                "Address": "127.0.0.1",
                "Port": 8888,
                "Tags": ["idl_service:EchoService", "methods:Echo,Ping", "protocol:thrift"],
                "Meta": {"idl_service": "EchoService", "methods": "Echo,Ping", "protocol": "thrift"},
                "Weights": {"Passing": 10, "Warning": 1},
                "Check": {
                    "CheckID": "fnmesh:echo:127.0.0.1:8888",
                    "Name": "fnmesh sidecar TTL",
                    "TTL": "10s",
                    "Status": "passing",
                    "DeregisterCriticalServiceAfter": "1m",
                },
            })
        );
    }

    #[test]
    fn health_answers_become_endpoints() {
        let body = br#"[
            {"Node": {"Address": "10.0.0.1"}, "Service": {"Address": "", "Port": 9000, "Tags": null, "Weights": null}},
            {"Node": {"Address": "10.0.0.2"}, "Service": {"Address": "127.0.0.1", "Port": 8888,
              "Tags": ["protocol:thrift", "plain"], "Weights": {"Passing": 10, "Warning": 1}}}
        ]"#;
        let got = endpoints(body).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].address, "10.0.0.1:9000".parse().unwrap());
        assert_eq!(got[0].weight, 1);
        assert_eq!(got[1].address, "127.0.0.1:8888".parse().unwrap());
        assert_eq!(got[1].weight, 10);
        assert_eq!(
            got[1].tags.get("protocol").map(String::as_str),
            Some("thrift")
        );
        assert!(endpoints(b"{").is_err());
    }
}
