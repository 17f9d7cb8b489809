//! What a drain waits for: calls and connections in progress, counted by guards that live as
//! long as they do.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

/// Counts one call (or connection) in `count` for as long as it lives.
pub struct Active(Arc<AtomicUsize>);

impl Active {
    pub fn new(count: &Arc<AtomicUsize>) -> Active {
        count.fetch_add(1, Ordering::SeqCst);
        Active(count.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
