//! The command line as a user meets it: help and version without a config file, and logs that
//! carry no terminal colour codes when they go to a file or a pipe.
#![forbid(unsafe_code)]

use std::process::Command;

fn fnmesh(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fnmesh"))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("fnmesh runs")
}

#[test]
fn help_and_version_need_no_config_file() {
    let help = fnmesh(&["--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for verb in ["run", "check", "reload"] {
        assert!(text.contains(verb), "{text}");
    }
    let version = fnmesh(&["--version"]);
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("fnmesh {}", env!("CARGO_PKG_VERSION"))
    );
    let run = fnmesh(&["run", "--help"]);
    assert!(run.status.success());
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(
        text.contains("--config <FILE>") && text.contains("--log-format"),
        "{text}"
    );
    // A command without its file is a usage error that says what is missing.
    let bare = fnmesh(&["check"]);
    assert_eq!(bare.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bare.stderr).contains("--config <FILE>"));
    let nothing = fnmesh(&[]);
    assert_eq!(nothing.status.code(), Some(2));
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    // A port already taken: the sidecar logs why it cannot start, and exits.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = std::env::temp_dir().join(format!("fnmesh-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("fnmesh.toml");
    let addr = taken.local_addr().unwrap();
    std::fs::write(&file, format!("[sidecar]\nlisten = \"{addr}\"\n")).unwrap();
    let out = fnmesh(&["run", "-c", file.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1));
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("cannot listen on"), "{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "colour codes in piped logs: {logs:?}"
    );
}
