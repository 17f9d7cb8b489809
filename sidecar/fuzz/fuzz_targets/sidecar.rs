// A whole sidecar in this process, started once: the fuzz targets send their input to it as a
// caller would, so the coverage is the sidecar's own (listener, Thrift connection, relay, pool).
// Its functions are the example echo functions, built in release (`cargo build --release -p
// fnmesh-tests --bins`; FNMESH_FUZZ_BINS names another directory). A panic on any of the
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
/// so that the instances die with the fuzzing process.
pub fn watchdog_or_nothing() {
    if std::env::args().nth(1).as_deref() == Some("__watchdog") {
        std::process::exit(match fnmesh::instances::watchdog::main() {
            std::process::ExitCode::SUCCESS => 0,
            _ => 1,
        });
    }
}

/// The sidecar's address, starting it (and one instance of each function) on first use.
pub fn addr() -> SocketAddr {
    *SIDECAR.get_or_init(start)
}

fn start() -> SocketAddr {
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
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let dir = std::env::temp_dir().join(format!("fnmesh-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "[sidecar]\nlisten = \"{addr}\"\nworkers = 1\nbusy_poll = \"0s\"\nheader_timeout = \"1s\"\n\n\
         [[function]]\nname = \"echo\"\nprotocol = \"thrift\"\nidl = \"{root}/idl/thrift/echo.thrift\"\n\
         command = [\"{bins}/echo-fn\"]\n[function.scale]\nmin = 1\nmax = 1\nconcurrency = 64\n\
         [function.policy]\ntimeout = \"1s\"\n\n\
         [[function]]\nname = \"grpc-echo\"\nprotocol = \"grpc\"\nidl = \"{root}/idl/proto/echo.proto\"\n\
         command = [\"{bins}/grpc-echo-fn\"]\n[function.scale]\nmin = 1\nmax = 1\nconcurrency = 64\n\
         [function.policy]\ntimeout = \"1s\"\n",
        root = root.display(),
        bins = bins.display(),
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
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}
