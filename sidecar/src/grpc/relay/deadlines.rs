//! The deadlines of a connection's streams, earliest first.

use super::*;

/// Deadlines of a connection's streams, earliest first. Entries are not removed when their
/// stream ends or moves on: [`Deadlines::next`] drops those it meets, and
/// [`Deadlines::compact`] rebuilds the heap once they outnumber the live streams.
#[derive(Default)]
pub(super) struct Deadlines(std::collections::BinaryHeap<std::cmp::Reverse<(Instant, u32)>>);

impl Deadlines {
    pub(super) fn push(&mut self, at: Instant, stream: u32) {
        self.0.push(std::cmp::Reverse((at, stream)));
    }

    /// The earliest entry `live` accepts (as deadline, stream); the ones before it are dropped.
    pub(super) fn next(&mut self, live: impl Fn(Instant, u32) -> bool) -> Option<Instant> {
        while let Some(&std::cmp::Reverse((at, id))) = self.0.peek() {
            if live(at, id) {
                return Some(at);
            }
            self.0.pop();
        }
        None
    }

    /// The earliest entry due by `now`, taken out.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<(Instant, u32)> {
        let &std::cmp::Reverse((at, _)) = self.0.peek()?;
        (at <= now)
            .then(|| self.0.pop().map(|std::cmp::Reverse(e)| e))
            .flatten()
    }

    /// Rebuilds the heap from `live` (every deadline still waited for) when it holds more than
    /// twice the `streams` there are (plus a little).
    pub(super) fn compact<I: Iterator<Item = (Instant, u32)>>(
        &mut self,
        streams: usize,
        live: impl FnOnce() -> I,
    ) {
        if self.0.len() > 2 * streams + 64 {
            self.0 = live().map(std::cmp::Reverse).collect();
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}
