//! `grpc.health.v1.Health`, answered by the sidecar for its gRPC functions' services (and `""`,
//! the sidecar itself): SERVING while the function can be routed to, at zero instances too
//! (nothing is started), NOT_SERVING once the sidecar drains; an unknown service is NOT_FOUND
//! (`Watch`: SERVICE_UNKNOWN), as the health protocol asks. `Watch` sends the status, then
//! NOT_SERVING when draining starts, and ends.

pub const SERVICE: &str = "grpc.health.v1.Health";
const SERVING: u8 = 1;
const NOT_SERVING: u8 = 2;
const SERVICE_UNKNOWN: u8 = 3;

/// The status a health call reports for a service the sidecar knows (or not) while it is
/// draining (or not).
pub fn status(known: bool, draining: bool) -> u8 {
    match (known, draining) {
        (false, _) => SERVICE_UNKNOWN,
        (true, false) => SERVING,
        (true, true) => NOT_SERVING,
    }
}

/// A HealthCheckResponse `{ status }` in a gRPC message frame.
pub fn message(status: u8) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(&[0, 0, 0, 0, 2, 0x08, status])
}

/// The `service` of a HealthCheckRequest in a gRPC message frame (uncompressed); `None`
/// when the bytes are not one.
pub fn parse_request(buf: &[u8]) -> Option<String> {
    if buf.is_empty() {
        return Some(String::new());
    }
    let (&compressed, rest) = buf.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let mut msg = rest.get(4..)?;
    if compressed != 0 || msg.len() != len {
        return None;
    }
    let mut service = String::new();
    while !msg.is_empty() {
        let tag = varint(&mut msg)?;
        match (tag >> 3, tag & 7) {
            (1, 2) => {
                let n = usize::try_from(varint(&mut msg)?).ok()?;
                let bytes = msg.get(..n)?;
                service = String::from_utf8(bytes.to_vec()).ok()?;
                msg = &msg[n..];
            }
            (_, 0) => {
                varint(&mut msg)?;
            }
            (_, 1) => msg = msg.get(8..)?,
            (_, 5) => msg = msg.get(4..)?,
            (_, 2) => {
                let n = usize::try_from(varint(&mut msg)?).ok()?;
                msg = msg.get(n..)?;
            }
            _ => return None,
        }
    }
    Some(service)
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}
