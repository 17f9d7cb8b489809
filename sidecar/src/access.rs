//! The access log (`[telemetry] access_log = true`): one JSON line per call on stdout, sampled
//! by `access_log_ratio`. Off by default; when on, the request path only draws the sample and
//! hands the call's fields to a writer thread, which formats and writes them in batches.

use std::{
    io::Write,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, OnceLock,
    },
    time::{Duration, SystemTime},
};

use crate::metrics::{CallMetrics, Outcome};

/// Whether the access log is on: the one load the request path pays when it is off.
static ON: AtomicBool = AtomicBool::new(false);
/// The sampling threshold: a call is logged when its draw is below it (`u64::MAX`: every call).
static THRESHOLD: AtomicU64 = AtomicU64::new(u64::MAX);
static LINES: OnceLock<mpsc::SyncSender<Line>> = OnceLock::new();
/// Lines dropped because the writer fell behind (stdout blocked).
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

/// How many lines may wait for the writer before new ones are dropped.
const BACKLOG: usize = 8192;

/// One call's fields, formatted by the writer thread.
struct Line {
    at: SystemTime,
    calls: &'static CallMetrics,
    outcome: Outcome,
    took: Duration,
    trace_id: Option<String>,
}

/// Turns the access log on, logging `ratio` (0 to 1) of calls. Once per process.
pub fn enable(ratio: f64) {
    let (tx, rx) = mpsc::sync_channel::<Line>(BACKLOG);
    if LINES.set(tx).is_err() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("fnmesh-access-log".into())
        .spawn(move || write_lines(rx));
    if spawned.is_err() {
        tracing::warn!("cannot start the access log's writer thread; the access log is off");
        return;
    }
    THRESHOLD.store(
        (ratio.clamp(0.0, 1.0) * u64::MAX as f64) as u64,
        Ordering::Relaxed,
    );
    ON.store(true, Ordering::Release);
}

/// Logs a call, if the access log is on and the call is drawn; `trace_id` is asked only then.
#[inline]
pub fn log(
    calls: &'static CallMetrics,
    outcome: Outcome,
    took_ns: u64,
    trace_id: impl FnOnce() -> Option<String>,
) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    sampled(calls, outcome, Duration::from_nanos(took_ns), trace_id());
}

#[cold]
fn sampled(
    calls: &'static CallMetrics,
    outcome: Outcome,
    took: Duration,
    trace_id: Option<String>,
) {
    let threshold = THRESHOLD.load(Ordering::Relaxed);
    if threshold != u64::MAX && draw() >= threshold {
        return;
    }
    let line = Line {
        at: SystemTime::now(),
        calls,
        outcome,
        took,
        trace_id,
    };
    if let Some(tx) = LINES.get() {
        if tx.try_send(line).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A uniform draw from this thread's xorshift generator.
pub(crate) fn draw() -> u64 {
    thread_local!(static STATE: std::cell::Cell<u64> = std::cell::Cell::new(seed()));
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    std::thread::current().id().hash(&mut h);
    SystemTime::now().hash(&mut h);
    h.finish() | 1
}

/// The writer thread: formats lines and writes what has come in one write.
fn write_lines(rx: mpsc::Receiver<Line>) {
    let mut out = Vec::with_capacity(64 << 10);
    while let Ok(first) = rx.recv() {
        out.clear();
        format_line(&mut out, &first);
        while let Ok(more) = rx.try_recv() {
            format_line(&mut out, &more);
            if out.len() > 60 << 10 {
                break;
            }
        }
        let mut stdout = std::io::stdout().lock();
        if stdout
            .write_all(&out)
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return;
        }
    }
}

/// `{"ts":..., "function":..., "method":..., "protocol":..., "outcome":..., "duration_us":...,
/// "trace_id": ...}` (`null` without traces).
fn format_line(out: &mut Vec<u8>, l: &Line) {
    let ts =
        l.at.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
    let v = serde_json::json!({
        "ts": ts,
        "function": l.calls.function(),
        "method": l.calls.method(),
        "protocol": l.calls.protocol(),
        "outcome": l.outcome.label(),
        "duration_us": l.took.as_secs_f64() * 1e6,
        "trace_id": l.trace_id,
    });
    let _ = serde_json::to_writer(&mut *out, &v);
    out.push(b'\n');
}
