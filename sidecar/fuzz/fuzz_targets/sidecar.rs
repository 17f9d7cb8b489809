// A whole sidecar in this process, started once: the fuzz targets send their input to it as a
// caller would, so the coverage is the sidecar's own (listener, Thrift connection, relay, pool).
// Its functions are the example echo functions, built in release (`cargo build --release -p
// fnmesh-tests --bins`; FNMESH_FUZZ_BINS names another directory), or one scripted instance
// that the fuzzing process plays itself (`scripted`). A panic on any of the
// sidecar's threads aborts the process, so that libFuzzer reports it.
// (No `forbid(unsafe_code)` here: libfuzzer-sys's entry point macro needs `#[no_mangle]`.)

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::OnceLock,
    time::{Duration, Instant},
};

static SIDECAR: OnceLock<SocketAddr> = OnceLock::new();

/// The sidecar started its watchdog (`current_exe __watchdog`, here this fuzz binary): be it,
/// so that the instances die with the fuzzing process. Or the sidecar started a scripted
/// instance (`current_exe __instance`): be that.
pub fn watchdog_or_nothing() {
    match std::env::args().nth(1).as_deref() {
        Some("__watchdog") => std::process::exit(match fnmesh::instances::watchdog::main() {
            std::process::ExitCode::SUCCESS => 0,
            _ => 1,
        }),
        Some("__instance") => scripted_instance(),
        _ => {}
    }
}

/// A scripted instance's process: it listens on the port the sidecar gave it (`PORT`) and hands
/// the listening socket to the fuzzing process (SCM_RIGHTS over the control socket), which then
/// accepts and answers from its input. Holding the socket itself, it is what the sidecar's
/// readiness check finds listening; it lives until the fuzzing process closes the control
/// connection.
fn scripted_instance() -> ! {
    use std::os::fd::AsRawFd;
    let control = std::env::var("FNMESH_FUZZ_CONTROL").expect("FNMESH_FUZZ_CONTROL");
    let port: u16 = std::env::var("PORT").expect("PORT").parse().unwrap();
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let mut c = std::os::unix::net::UnixStream::connect(control).unwrap();
    let fds = [listener.as_raw_fd()];
    nix::sys::socket::sendmsg::<()>(
        c.as_raw_fd(),
        &[std::io::IoSlice::new(b"l")],
        &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .unwrap();
    let _ = c.read(&mut [0u8; 1]);
    std::process::exit(0);
}

/// Takes the listening socket a scripted instance sends on `c`.
fn receive_listener(c: &std::os::unix::net::UnixStream) -> TcpListener {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = nix::sys::socket::recvmsg::<()>(
        c.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    for cmsg in msg.cmsgs().unwrap() {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: the kernel just installed this descriptor in this process for us alone.
            return unsafe { TcpListener::from_raw_fd(fds[0]) };
        }
    }
    panic!("the scripted instance sent no socket");
}

const ECHO_FUNCTIONS: &str = "\
[[function]]\nname = \"echo\"\nprotocol = \"thrift\"\nidl = \"{root}/idl/thrift/echo.thrift\"\n\
command = [\"{bins}/echo-fn\"]\n[function.scale]\nmin = 1\nmax = 1\nconcurrency = 64\n\
[function.policy]\ntimeout = \"1s\"\n\n\
[[function]]\nname = \"grpc-echo\"\nprotocol = \"grpc\"\nidl = \"{root}/idl/proto/echo.proto\"\n\
command = [\"{bins}/grpc-echo-fn\"]\n[function.scale]\nmin = 1\nmax = 1\nconcurrency = 64\n\
[function.policy]\ntimeout = \"1s\"\n";

/// The sidecar's address, starting it (and one instance of each example function) on first
/// use.
pub fn addr() -> SocketAddr {
    *SIDECAR.get_or_init(|| start(ECHO_FUNCTIONS))
}

/// The address of a sidecar whose one function, `echo.Echo` over gRPC, has one scripted
/// instance, and that instance's listener (bound once the instance process says its port).
pub fn scripted() -> (SocketAddr, &'static TcpListener) {
    static LISTENER: OnceLock<TcpListener> = OnceLock::new();
    let addr = *SIDECAR.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("fnmesh-fuzz-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let control = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let control_path = path.display().to_string();
        std::thread::spawn(move || {
            let (c, _) = control.accept().unwrap();
            let _ = LISTENER.set(receive_listener(&c));
            // Held open for the process's life: the instance process exits when it closes.
            loop {
                std::thread::park();
            }
        });
        let exe = std::env::current_exe().unwrap();
        start(&format!(
            "[[function]]\nname = \"scripted\"\nprotocol = \"grpc\"\n\
             idl = \"{{root}}/idl/proto/echo.proto\"\ncommand = [\"{}\", \"__instance\"]\n\
             [function.env]\nFNMESH_FUZZ_CONTROL = \"{control_path}\"\n\
             [function.scale]\nmin = 1\nmax = 1\nconcurrency = 64\n\
             [function.policy]\ntimeout = \"1s\"\n",
            exe.display()
        ))
    });
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(l) = LISTENER.get() {
            return (addr, l);
        }
        assert!(
            Instant::now() < until,
            "the scripted instance did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn start(functions: &str) -> SocketAddr {
    // As a Rust program's own `main` does (libFuzzer's `main` runs here instead): a write to a
    // connection the peer closed is an error to handle (EPIPE), not a signal that kills. The
    // sidecar's vectored writes (writev) cannot ask for that per call.
    // SAFETY: SIG_IGN installs no handler code; nothing else in this process handles SIGPIPE.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigIgn,
        );
    }
    std::panic::set_hook(Box::new(|info| {
        eprintln!("{info}");
        std::process::abort();
    }));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bins = std::env::var("FNMESH_FUZZ_BINS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("target/release"));
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let dir = std::env::temp_dir().join(format!("fnmesh-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let functions = functions
        .replace("{root}", &root.display().to_string())
        .replace("{bins}", &bins.display().to_string());
    let text = format!(
        "[sidecar]\nlisten = \"{addr}\"\nworkers = 1\nbusy_poll = \"0s\"\nheader_timeout = \"1s\"\n\n{functions}"
    );
    let path = dir.join("fnmesh.toml");
    std::fs::write(&path, text).unwrap();
    let config = fnmesh::config::Config::load(&path).expect("the fuzz sidecar's config");
    std::env::set_var("RUST_LOG", "off");
    std::thread::spawn(move || fnmesh::server::main(path, config, fnmesh::server::LogFormat::Text));
    let until = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < until, "the fuzz sidecar did not listen");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Both instances ready before the first input.
    std::thread::sleep(Duration::from_millis(500));
    addr
}

/// Sends `bytes` on a new connection, half-closes, and reads what comes back until the sidecar
/// closes or `wait` passes without a byte.
pub fn exchange(bytes: &[u8], wait: Duration) {
    let Ok(mut s) = TcpStream::connect(addr()) else {
        return;
    };
    let _ = s.set_nodelay(true);
    if s.write_all(bytes).is_err() {
        return;
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = s.set_read_timeout(Some(wait));
    let mut buf = [0u8; 16 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// The fuzz input read as a script: each read takes the next bytes, zeros once it is spent.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    /// Up to `n` bytes (fewer when the input runs out).
    pub fn take(&mut self, n: usize) -> Vec<u8> {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head.to_vec()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
