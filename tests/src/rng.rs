//! A xorshift generator for the seeded random sessions (and the hostile test function): a run
//! replays exactly from its seed. `FNMESH_FUZZ_SEED` picks another seed, `FNMESH_FUZZ_SESSIONS`
//! runs more sessions.

pub struct Rng(pub u64);

impl Rng {
    /// A generator seeded with `FNMESH_FUZZ_SEED` when set, else `default`.
    pub fn from_env(default: u64) -> Rng {
        Rng(fuzz_setting("FNMESH_FUZZ_SEED", default).max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// The number in environment variable `name`, else `default`.
pub fn fuzz_setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

impl Rng {
    /// Changes one byte of `bytes`, never inside one of `keep` (the calls' texts, which say
    /// whose an answer is).
    pub fn change_a_byte(&mut self, bytes: &mut [u8], keep: &[std::ops::Range<usize>]) {
        let at = loop {
            let at = self.below(bytes.len());
            if !keep.iter().any(|t| t.contains(&at)) {
                break at;
            }
        };
        bytes[at] ^= 1 + self.below(255) as u8;
    }

    /// Writes `bytes` in pieces of 1 to `most` bytes, now and then pausing 300 us; stops early
    /// when the peer closed.
    pub fn write_in_pieces(&mut self, s: &mut std::net::TcpStream, bytes: &[u8], most: usize) {
        use std::io::Write;
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = (1 + self.below(rest.len().min(most))).min(rest.len());
            if s.write_all(&rest[..n]).is_err() {
                return;
            }
            rest = &rest[n..];
            if self.below(4) == 0 {
                std::thread::sleep(std::time::Duration::from_micros(300));
            }
        }
    }
}
