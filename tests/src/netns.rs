//! A test network of nodes: one network namespace per node (`ip netns`), each with a veth pair
//! whose other end is on a bridge in the test's own namespace. Nodes reach each other and the
//! host side (where Consul or etcd listen) by their addresses; everything is removed on drop.
//! Needs root, as CI runs.

use std::{
    net::{IpAddr, Ipv4Addr},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

/// The namespaces, veth pairs and bridge of one test.
pub struct Net {
    bridge: String,
    namespaces: Vec<String>,
    /// `10.A.B` of the /24 the test uses.
    subnet: [u8; 3],
}

/// Runs `ip` with `args`, which must succeed.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    /// A network of `nodes` namespaces on a new bridge.
    pub fn new(nodes: usize) -> Net {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Names fit 15 bytes; the subnet is the process's and the test's own.
        let tag = format!("{}{k}", pid % 100_000);
        let subnet = [10, (100 + k % 100) as u8, (pid % 250) as u8];
        let bridge = format!("fnb{tag}");
        let host = format!("{}.{}.{}.1/24", subnet[0], subnet[1], subnet[2]);
        ip(&["link", "add", &bridge, "type", "bridge"]);
        let mut net = Net {
            bridge: bridge.clone(),
            namespaces: Vec::new(),
            subnet,
        };
        ip(&["addr", "add", &host, "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for i in 0..nodes {
            let ns = format!("fnmesh-{tag}-{i}");
            ip(&["netns", "add", &ns]);
            net.namespaces.push(ns.clone());
            let (outer, inner) = (format!("fv{tag}{i}a"), format!("fv{tag}{i}b"));
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["link", "set", &outer, "master", &bridge]);
            ip(&["link", "set", &outer, "up"]);
            let addr = format!("{}/24", net.node(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    /// The host side's address (the bridge's), where the registry listens.
    pub fn host(&self) -> IpAddr {
        let [a, b, c] = self.subnet;
        IpAddr::V4(Ipv4Addr::new(a, b, c, 1))
    }

    /// Node `i`'s address.
    pub fn node(&self, i: usize) -> IpAddr {
        let [a, b, c] = self.subnet;
        IpAddr::V4(Ipv4Addr::new(a, b, c, 10 + i as u8))
    }

    /// Node `i`'s namespace.
    pub fn namespace(&self, i: usize) -> &str {
        &self.namespaces[i]
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // A namespace goes with its veth pair; processes still in it keep it alive only as
        // long as they run (the test's sidecars are killed before this).
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}
