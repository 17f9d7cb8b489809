//! Whether the socket listening on an instance's port belongs to the instance (its process
//! group), not to another process that took the port after fnmesh chose it. Written here: one
//! NETLINK_SOCK_DIAG dump of listening TCP sockets and a walk of the group's descriptors, where a
//! netlink crate would add a dependency for 60 lines.

use std::{collections::HashSet, os::fd::AsRawFd};

use nix::sys::socket::{
    recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType,
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const TCP_LISTEN: u32 = 10;
const NLMSG_HDR: usize = 16;

/// Whether some process of the group `pgid` holds the socket listening on TCP `port` (IPv4, or
/// IPv6 as a server bound to `[::]` takes IPv4 too). `None` when it cannot be told (no netlink,
/// no /proc): the caller then trusts the connect.
pub fn listener_is_in_group(port: u16, pgid: u32) -> Option<bool> {
    let mut listeners = listening_inodes(AF_INET, port)?;
    listeners.extend(listening_inodes(AF_INET6, port)?);
    if listeners.is_empty() {
        return Some(false);
    }
    // The group's leader (the instance's own process) usually listens itself: its descriptors
    // answer without a walk of every process.
    if !sockets_of(pgid).is_disjoint(&listeners) {
        return Some(true);
    }
    Some(group_sockets(pgid).is_some_and(|held| !held.is_disjoint(&listeners)))
}

/// The inodes of the sockets process `pid` holds open.
fn sockets_of(pid: u32) -> HashSet<u64> {
    let mut held = HashSet::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return held;
    };
    for fd in fds.flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse().ok())
        {
            held.insert(inode);
        }
    }
    held
}

/// The inodes of the TCP sockets of `family` listening on `port`.
fn listening_inodes(family: u8, port: u16) -> Option<HashSet<u64>> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .ok()?;
    // nlmsghdr (16 bytes), then inet_diag_req_v2: family, protocol, ext, pad, states, and a
    // 48-byte inet_diag_sockid left zero (the dump is filtered here, by port).
    let mut req = Vec::with_capacity(NLMSG_HDR + 56);
    req.extend_from_slice(&((NLMSG_HDR + 56) as u32).to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&[0; 8]); // sequence, port id
    req.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    req.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    req.extend_from_slice(&[0; 48]);
    send(fd.as_raw_fd(), &req, MsgFlags::empty()).ok()?;
    let mut found = HashSet::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).ok()?;
        let mut at = 0;
        while at + NLMSG_HDR <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().ok()?) as usize;
            let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().ok()?);
            if len < NLMSG_HDR || at + len > n {
                return None;
            }
            match kind {
                NLMSG_DONE => return Some(found),
                NLMSG_ERROR => return None,
                _ => {
                    // inet_diag_msg: family, state, timer, retrans, then the sockid (source
                    // port first, big-endian), ..., and the inode at offset 68.
                    let msg = &buf[at + NLMSG_HDR..at + len];
                    let sport = msg.get(4..6).map(|p| u16::from_be_bytes([p[0], p[1]]));
                    let inode = msg
                        .get(68..72)
                        .map(|i| u32::from_ne_bytes([i[0], i[1], i[2], i[3]]));
                    if let (Some(sport), Some(inode)) = (sport, inode) {
                        if sport == port {
                            found.insert(u64::from(inode));
                        }
                    }
                }
            }
            at += (len + 3) & !3;
        }
    }
}

/// The inodes of the sockets the processes of group `pgid` hold open.
fn group_sockets(pgid: u32) -> Option<HashSet<u64>> {
    let mut held = HashSet::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid != pgid && process_group(pid) == Some(pgid) {
            held.extend(sockets_of(pid));
        }
    }
    Some(held)
}

/// The process group of `pid`, from `/proc/PID/stat` (the fifth field; the second, the command,
/// may hold spaces and parentheses, so fields are counted after its last `)`).
fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_of_this_process_is_found_and_one_of_another_group_is_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let me = std::process::id();
        let group = process_group(me).unwrap();
        assert_eq!(listener_is_in_group(port, group), Some(true));
        // Another group: PID 1's.
        assert_eq!(listener_is_in_group(port, 1), Some(false));
        drop(l);
        assert_eq!(listener_is_in_group(port, group), Some(false));
        // A server bound to IPv6 (as grpcio binds `[::]`).
        if let Ok(l6) = std::net::TcpListener::bind("[::1]:0") {
            let port = l6.local_addr().unwrap().port();
            assert_eq!(listener_is_in_group(port, group), Some(true));
        }
    }
}
