//! etcd, through its v3 JSON gateway (`POST /v3/...` on the client URL, which etcd serves by
//! default), in the layout of Kitex's registry-etcd: key `{prefix}/{name}/{host}:{port}`, value
//! `{"network","address","weight","tags"}`, attached to a lease that renewals keep alive. A lease
//! that ran out, or a key that vanished, is reported lost, so the registrar puts it again.
//!
//! Why the gateway and not etcd's gRPC API: the gRPC client (`etcd-client`, over tonic) needs
//! `protoc` at build time and a second HTTP/2 stack; the gateway takes the same hyper client as
//! Consul, so etcd support costs the build nothing.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use bytes::BytesMut;
use futures_util::Stream;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    http::{Http, Tls},
    Endpoint, Error, Registration, Registry, Resolver, Service,
};

const NAME: &str = "etcd";
/// How long one request may take.
const REQUEST: Duration = Duration::from_secs(5);
/// The longest line a watch may send (one change notification).
const MAX_WATCH_LINE: usize = 4 << 20;

/// An etcd cluster.
#[derive(Clone)]
pub struct Etcd {
    /// The members, tried in turn until one answers.
    members: Vec<Http>,
    prefix: String,
    /// Each registration's lease, by key.
    leases: Arc<Mutex<HashMap<String, i64>>>,
    /// With auth enabled on the cluster: the user, and the token it was last given.
    auth: Option<Arc<Auth>>,
}

/// etcd's user/password auth: a token from `auth/authenticate`, sent in `Authorization`, got
/// again when the cluster no longer takes it (simple tokens expire).
struct Auth {
    name: String,
    password: String,
    token: Mutex<Option<http::HeaderValue>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The value stored for one endpoint.
#[derive(Serialize, Deserialize)]
struct Value {
    network: String,
    address: String,
    weight: u32,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

/// The parts of gateway answers fnmesh reads. 64-bit numbers come as strings.
#[derive(Deserialize, Default)]
struct Answer {
    #[serde(default, rename = "ID")]
    id: Option<String>,
    #[serde(default, rename = "TTL")]
    ttl: Option<String>,
    #[serde(default)]
    kvs: Vec<KeyValue>,
    #[serde(default)]
    header: Header,
    #[serde(default)]
    events: Vec<serde_json::Value>,
    #[serde(default)]
    canceled: bool,
    #[serde(default)]
    result: Option<Box<Answer>>,
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default)]
    token: Option<String>,
}

#[derive(Deserialize, Default)]
struct Header {
    #[serde(default)]
    revision: Option<String>,
}

#[derive(Deserialize)]
struct KeyValue {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
}

fn number(text: Option<&str>) -> i64 {
    text.and_then(|t| t.parse().ok()).unwrap_or(0)
}

/// The range of every key that starts with `prefix`, base64 as the gateway takes it: `prefix`
/// and the key just past it (its last byte incremented).
fn prefix_range(prefix: &str) -> (String, String) {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            break;
        }
    }
    (B64.encode(prefix), B64.encode(end))
}

impl Etcd {
    /// A client of the cluster at `endpoints` (`http://host:port`, or `https://host:port`
    /// trusted and authenticated as `tls` says); nothing is sent yet.
    pub async fn new(endpoints: &[String], prefix: &str, tls: &Tls) -> Result<Etcd, String> {
        let members = endpoints
            .iter()
            .map(|e| Http::new(NAME, e, tls).map_err(|e| format!("etcd: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if members.is_empty() {
            return Err("etcd: no endpoints".into());
        }
        Ok(Etcd {
            members,
            prefix: prefix.trim_end_matches('/').to_owned(),
            leases: Arc::default(),
            auth: None,
        })
    }

    /// The same client, authenticating as `name` with `password` (the cluster has auth on).
    pub fn with_auth(mut self, name: &str, password: &str) -> Etcd {
        self.auth = Some(Arc::new(Auth {
            name: name.to_owned(),
            password: password.to_owned(),
            token: Mutex::new(None),
        }));
        self
    }

    /// `member`, carrying the auth token when the cluster wants one (authenticating first when
    /// there is none yet).
    async fn as_user(&self, member: &Http) -> Result<Http, Error> {
        let Some(auth) = &self.auth else {
            return Ok(member.clone());
        };
        let cached = auth.token.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let token = match cached {
            Some(t) => t,
            None => {
                let body = json!({ "name": auth.name, "password": auth.password });
                let a = member
                    .send(
                        Method::POST,
                        "/v3/auth/authenticate",
                        Some(body.to_string().into_bytes()),
                        REQUEST,
                    )
                    .await?;
                let got = answer("auth/authenticate", a.status, &a.body)?;
                let t = got
                    .token
                    .and_then(|t| http::HeaderValue::from_str(&t).ok())
                    .ok_or_else(|| refused("auth/authenticate", a.status, b"no token"))?;
                *auth.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(t.clone());
                t
            }
        };
        let mut m = member.clone();
        m.headers.push((http::header::AUTHORIZATION, token));
        Ok(m)
    }

    /// Forgets the token after the cluster refused it (expired): the next request gets another.
    fn token_refused(&self, status: StatusCode, body: &[u8]) -> bool {
        let expired = status == StatusCode::UNAUTHORIZED
            || String::from_utf8_lossy(body).contains("invalid auth token");
        if let (true, Some(auth)) = (expired, &self.auth) {
            *auth.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return true;
        }
        false
    }

    /// `{prefix}/{name}/{host}:{port}`.
    pub fn key(&self, r: &Registration) -> String {
        format!("{}/{}/{}", self.prefix, r.name, r.address)
    }

    /// The stored value for `r`.
    pub fn value(r: &Registration) -> String {
        json!({
            "network": "tcp",
            "address": r.address.to_string(),
            "weight": r.weight,
            "tags": r.tags(),
        })
        .to_string()
    }

    fn lease(&self, key: &str) -> Option<i64> {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
    }

    /// `POST /v3/{call}` with `body` on the first member that answers.
    async fn call(&self, call: &str, body: serde_json::Value) -> Result<Answer, Error> {
        let path = format!("/v3/{call}");
        let body = body.to_string().into_bytes();
        let mut last = None;
        for member in &self.members {
            // Twice when the token had expired.
            for _ in 0..2 {
                let sent = match self.as_user(member).await {
                    Ok(m) => {
                        m.send(Method::POST, &path, Some(body.clone()), REQUEST)
                            .await
                    }
                    Err(e) => Err(e),
                };
                match sent {
                    Ok(a) if self.token_refused(a.status, &a.body) => {
                        last = Some(refused(call, a.status, &a.body));
                    }
                    Ok(a) => return answer(call, a.status, &a.body),
                    Err(e) => {
                        last = Some(e);
                        break;
                    }
                }
            }
        }
        Err(last.unwrap_or(Error::Unreachable {
            registry: NAME,
            detail: "no endpoints".into(),
        }))
    }

    /// The keys and values under `prefix` (decoded; pairs that do not decode are skipped) and
    /// the revision they were read at.
    async fn list(&self, prefix: &str) -> Result<(Vec<(Vec<u8>, Vec<u8>)>, i64), Error> {
        let (key, range_end) = prefix_range(prefix);
        let got = self
            .call("kv/range", json!({ "key": key, "range_end": range_end }))
            .await?;
        let pairs = got
            .kvs
            .iter()
            .filter_map(|kv| Some((B64.decode(&kv.key).ok()?, B64.decode(&kv.value).ok()?)))
            .collect();
        Ok((pairs, number(got.header.revision.as_deref())))
    }

    /// A watch of every key under `prefix` from `revision` on: a body of one JSON answer per
    /// line, read as it comes.
    async fn watch(&self, prefix: &str, revision: i64) -> Result<Watch, Error> {
        let (key, range_end) = prefix_range(prefix);
        let body = json!({ "create_request": {
            "key": key, "range_end": range_end, "start_revision": revision,
        }});
        let body = body.to_string().into_bytes();
        let mut last = None;
        for member in &self.members {
            let opened = match self.as_user(member).await {
                Ok(m) => {
                    m.open(Method::POST, "/v3/watch", Some(body.clone()), REQUEST)
                        .await
                }
                Err(e) => Err(e),
            };
            match opened {
                Ok((StatusCode::OK, body)) => {
                    return Ok(Watch {
                        body,
                        buf: BytesMut::new(),
                    })
                }
                Ok((status, _)) => last = Some(refused("watch", status, b"")),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(Error::Unreachable {
            registry: NAME,
            detail: "no endpoints".into(),
        }))
    }
}

/// A gateway answer, or the error it carries.
fn answer(call: &str, status: StatusCode, body: &[u8]) -> Result<Answer, Error> {
    if status != StatusCode::OK {
        return Err(refused(call, status, body));
    }
    let a: Answer = serde_json::from_slice(body).map_err(|e| Error::Refused {
        registry: NAME,
        detail: format!("{call}: unreadable answer: {e}"),
    })?;
    match a.error {
        Some(e) => Err(Error::Refused {
            registry: NAME,
            detail: format!("{call}: {e}"),
        }),
        None => Ok(a),
    }
}

fn refused(call: &str, status: StatusCode, body: &[u8]) -> Error {
    Error::Refused {
        registry: NAME,
        detail: format!("{call}: {status} {}", String::from_utf8_lossy(body).trim()),
    }
}

impl Registry for Etcd {
    async fn register(&self, r: &Registration, ttl: Duration) -> Result<(), Error> {
        let key = self.key(r);
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let granted = self.call("lease/grant", json!({ "TTL": ttl })).await?;
        let lease = number(granted.id.as_deref());
        let put = json!({
            "key": B64.encode(&key),
            "value": B64.encode(Self::value(r)),
            "lease": lease,
        });
        self.call("kv/put", put).await?;
        let old = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, lease);
        if let Some(old) = old.filter(|o| *o != lease) {
            let _ = self.call("lease/revoke", json!({ "ID": old })).await;
        }
        Ok(())
    }

    async fn renew(&self, r: &Registration) -> Result<(), Error> {
        let key = self.key(r);
        let lost = |detail: &str| Error::Lost {
            registry: NAME,
            detail: format!("{key}: {detail}"),
        };
        let Some(lease) = self.lease(&key) else {
            return Err(lost("never registered"));
        };
        let kept = self.call("lease/keepalive", json!({ "ID": lease })).await?;
        let ttl = kept.result.as_ref().map_or(0, |a| number(a.ttl.as_deref()));
        if ttl <= 0 {
            return Err(lost("the lease ran out"));
        }
        let got = self
            .call("kv/range", json!({ "key": B64.encode(&key) }))
            .await?;
        if got.kvs.is_empty() {
            return Err(lost("the key was removed"));
        }
        Ok(())
    }

    async fn deregister(&self, r: &Registration) -> Result<(), Error> {
        let key = self.key(r);
        self.call("kv/deleterange", json!({ "key": B64.encode(&key) }))
            .await?;
        let lease = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        if let Some(lease) = lease {
            let _ = self.call("lease/revoke", json!({ "ID": lease })).await;
        }
        Ok(())
    }
}

/// Endpoints from the values under a name's prefix (values that do not parse are skipped).
fn endpoints<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = values
        .filter_map(|v| {
            let v: Value = serde_json::from_slice(v).ok()?;
            Some(Endpoint {
                address: v.address.parse::<SocketAddr>().ok()?,
                weight: v.weight,
                tags: v.tags,
            })
        })
        .collect();
    out.sort_by_key(|e| e.address);
    out
}

/// An open watch: its body, and what has come of the line being read.
struct Watch {
    body: hyper::body::Incoming,
    buf: BytesMut,
}

impl Watch {
    /// The next answer on the watch; `None` once it has ended or broken.
    async fn next(&mut self) -> Option<Answer> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line = self.buf.split_to(end + 1);
                let mut parsed: Answer = serde_json::from_slice(&line).ok()?;
                return Some(match parsed.result.take() {
                    Some(result) => *result,
                    None => parsed,
                });
            }
            if self.buf.len() > MAX_WATCH_LINE {
                return None;
            }
            let frame = self.body.frame().await?.ok()?;
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }
}

/// Where a resolution stands: watching from a revision, or to (re)start.
enum Follow {
    Start { after_error: bool },
    Watching(Box<Watch>),
}

impl Etcd {
    /// The keys under `prefix` read in full (and read by `read`), then again after each
    /// change the prefix watch reports.
    fn follow<T: Send + 'static>(
        &self,
        prefix: String,
        read: impl Fn(&str, Vec<(Vec<u8>, Vec<u8>)>) -> T + Clone + Send + Sync + 'static,
    ) -> impl Stream<Item = Result<T, Error>> + Send + 'static {
        let etcd = self.clone();
        let start = Follow::Start { after_error: false };
        futures_util::stream::unfold(start, move |state| {
            let (etcd, prefix, read) = (etcd.clone(), prefix.clone(), read.clone());
            async move {
                let mut state = state;
                loop {
                    state = match state {
                        Follow::Start { after_error } => {
                            if after_error {
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                            let (pairs, revision) = match etcd.list(&prefix).await {
                                Ok(got) => got,
                                Err(e) => {
                                    let next = Follow::Start { after_error: true };
                                    return Some((Err(e), next));
                                }
                            };
                            let next = match etcd.watch(&prefix, revision + 1).await {
                                Ok(watch) => Follow::Watching(Box::new(watch)),
                                Err(_) => Follow::Start { after_error: true },
                            };
                            return Some((Ok(read(&prefix, pairs)), next));
                        }
                        Follow::Watching(mut watch) => match watch.next().await {
                            Some(answer) if !answer.canceled && answer.error.is_none() => {
                                if answer.events.is_empty() {
                                    Follow::Watching(watch)
                                } else {
                                    // Read the whole list again: simpler than applying events,
                                    // and as fresh.
                                    Follow::Start { after_error: false }
                                }
                            }
                            _ => Follow::Start { after_error: true },
                        },
                    };
                }
            }
        })
    }
}

/// Services from the keys under the whole prefix (`{prefix}/{name}/{addr}`), with the IDL
/// service their values' tags name.
fn services(prefix: &str, pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<Service> {
    crate::services(pairs.into_iter().filter_map(|(key, value)| {
        let key = String::from_utf8(key).ok()?;
        let name = key.strip_prefix(prefix)?.split_once('/')?.0.to_owned();
        let idl = serde_json::from_slice::<Value>(&value)
            .ok()
            .and_then(|mut v| v.tags.remove("idl_service"));
        (!name.is_empty()).then_some((name, idl))
    }))
}

impl Resolver for Etcd {
    /// The name's keys, followed.
    fn resolve(
        &self,
        name: &str,
    ) -> impl Stream<Item = Result<Vec<Endpoint>, Error>> + Send + 'static {
        let prefix = format!("{}/{}/", self.prefix, name);
        self.follow(prefix, |_, pairs| {
            endpoints(pairs.iter().map(|(_, v)| v.as_slice()))
        })
    }

    /// Every key under the prefix, followed.
    fn services(&self) -> impl Stream<Item = Result<Vec<Service>, Error>> + Send + 'static {
        self.follow(format!("{}/", self.prefix), services)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_the_names_under_the_prefix() {
        let r = |name: &str, idl: Option<&str>| Registration {
            name: name.into(),
            address: "127.0.0.1:8888".parse().unwrap(),
            protocol: "grpc".into(),
            idl_service: idl.map(Into::into),
            methods: vec![],
            weight: 10,
        };
        let pairs = vec![
            (
                b"p/echo/127.0.0.1:1".to_vec(),
                Etcd::value(&r("echo", Some("echo.Echo"))).into_bytes(),
            ),
            (b"p/echo/127.0.0.1:2".to_vec(), b"not json".to_vec()),
            (
                b"p/plain/10.0.0.1:9".to_vec(),
                Etcd::value(&r("plain", None)).into_bytes(),
            ),
            (b"p/nothing".to_vec(), b"{}".to_vec()),
        ];
        let got = services("p/", pairs);
        let names: Vec<(&str, Option<&str>)> = got
            .iter()
            .map(|s| (s.name.as_str(), s.idl_service.as_deref()))
            .collect();
        assert_eq!(names, [("echo", Some("echo.Echo")), ("plain", None)]);
    }

    #[test]
    fn values_are_kitex_registry_etcd_instances() {
        let r = Registration {
            name: "echo".into(),
            address: "127.0.0.1:8888".parse().unwrap(),
            protocol: "grpc".into(),
            idl_service: Some("echo.Echo".into()),
            methods: vec!["UnaryEcho".into()],
            weight: 10,
        };
        let v: serde_json::Value = serde_json::from_str(&Etcd::value(&r)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "network": "tcp",
                "address": "127.0.0.1:8888",
                "weight": 10,
                "tags": {"protocol": "grpc", "idl_service": "echo.Echo", "methods": "UnaryEcho"},
            })
        );
        let back = endpoints([Etcd::value(&r).as_bytes(), b"junk".as_slice()].into_iter());
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].address, r.address);
        assert_eq!(
            back[0].tags.get("protocol").map(String::as_str),
            Some("grpc")
        );
    }

    #[test]
    fn a_prefix_range_ends_just_past_the_prefix() {
        let (key, end) = prefix_range("kitex/registry-etcd/echo/");
        assert_eq!(B64.decode(key).unwrap(), b"kitex/registry-etcd/echo/");
        assert_eq!(B64.decode(end).unwrap(), b"kitex/registry-etcd/echo0");
        let (_, end) = prefix_range("a\u{7f}");
        assert_eq!(B64.decode(end).unwrap(), b"a\x80");
    }

    #[test]
    fn gateway_answers_are_read_with_their_64_bit_numbers_as_text() {
        let granted = br#"{"header":{"revision":"7"},"ID":"7587899357015709445","TTL":"5"}"#;
        let a = answer("lease/grant", StatusCode::OK, granted).unwrap();
        assert_eq!(number(a.id.as_deref()), 7_587_899_357_015_709_445);
        assert_eq!(number(a.header.revision.as_deref()), 7);
        let kept = br#"{"result":{"header":{},"ID":"12345"}}"#;
        let a = answer("lease/keepalive", StatusCode::OK, kept).unwrap();
        assert_eq!(a.result.map_or(0, |r| number(r.ttl.as_deref())), 0);
        let failed = br#"{"error":"etcdserver: requested lease not found","code":5}"#;
        assert!(answer("lease/revoke", StatusCode::OK, failed).is_err());
        assert!(answer("kv/put", StatusCode::BAD_REQUEST, b"no").is_err());
    }
}
