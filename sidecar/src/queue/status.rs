//! An async call's status, kept as the last message on `fnmesh.calls.{id}` in the
//! `FNMESH_CALLS` stream (a key-value store, by call id): written when the call is queued, when
//! an attempt starts, and when it ends; compare-and-set on the subject's last sequence so that
//! a cancel and a consumer's start never both win.

use async_nats::jetstream::{self, context::PublishErrorKind, stream::LastRawMessageErrorKind};
use serde_json::{json, Value};

use super::js::Js;

fn subject(id: &str) -> String {
    format!("fnmesh.calls.{id}")
}

/// Where a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }

    fn named(s: &str) -> Option<State> {
        [
            State::Queued,
            State::Running,
            State::Succeeded,
            State::Failed,
            State::Cancelled,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// A call's status, as `GET /async/{id}` shows it (a JSON object; `state` read from it).
#[derive(Debug, Clone)]
pub(crate) struct Status {
    pub doc: Value,
    /// The bucket entry's revision it was read at (0: not stored yet).
    pub revision: u64,
}

impl Status {
    /// A call just queued.
    pub fn queued(id: &str, function: &str, method: &str, callback: Option<&str>) -> Status {
        let mut doc = json!({
            "id": id,
            "function": function,
            "method": method,
            "state": "queued",
            "attempts": 0,
            "queued_at": now_rfc3339(),
        });
        if let Some(url) = callback {
            doc["callback"] = json!(url);
        }
        Status { doc, revision: 0 }
    }

    pub fn state(&self) -> Option<State> {
        self.doc["state"].as_str().and_then(State::named)
    }

    pub fn set(&mut self, state: State) {
        self.doc["state"] = json!(state.as_str());
    }

    pub fn bytes(&self) -> bytes::Bytes {
        bytes::Bytes::from(self.doc.to_string())
    }
}

/// The status of call `id`, if it is still kept (ids are hex: anything else is none).
pub(crate) async fn load(js: &Js, id: &str) -> Result<Option<Status>, String> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    match js.calls.get_last_raw_message_by_subject(&subject(id)).await {
        Ok(m) => Ok(serde_json::from_slice(&m.payload).ok().map(|doc| Status {
            doc,
            revision: m.sequence,
        })),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Writes `status` if the call's subject is still at the sequence it was read at (none yet,
/// for a new call); `false` if another writer came first.
pub(crate) async fn store(js: &Js, id: &str, status: &mut Status) -> Result<bool, String> {
    let publish = jetstream::message::PublishMessage::build()
        .payload(status.bytes())
        .expected_last_subject_sequence(status.revision);
    let acked = match js.ctx.send_publish(subject(id), publish).await {
        Ok(ack) => ack.await,
        Err(e) => Err(e),
    };
    match acked {
        Ok(ack) => {
            status.revision = ack.sequence;
            Ok(true)
        }
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// UTC now as RFC 3339 with milliseconds (`2026-12-05T12:00:00.000Z`).
pub(crate) fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 as a civil date (Howard Hinnant's algorithm).
fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::civil(0), (1970, 1, 1));
        assert_eq!(super::civil(20_792), (2026, 12, 5));
        assert_eq!(super::civil(11_016), (2000, 2, 29));
    }
}
