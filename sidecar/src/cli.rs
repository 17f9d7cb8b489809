//! The command line: `fnmesh run`, `fnmesh check`.

use std::{path::PathBuf, process::ExitCode};

use crate::config::Config;

const USAGE: &str = "usage:
  fnmesh run -c FILE [--log-format json]   serve the functions FILE configures
  fnmesh check -c FILE                     validate FILE without starting anything
  fnmesh reload -c FILE                    validate FILE, then have the sidecar serving it
                                           (at its sidecar.admin address) reload it";

/// Runs the command line in `std::env::args`.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(verb) = args.first().map(String::as_str) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    if verb == "__watchdog" {
        return crate::instances::watchdog::main();
    }
    let mut file = None;
    let mut json = false;
    let mut rest = args[1..].iter();
    while let Some(a) = rest.next() {
        match a.as_str() {
            "-c" | "--config" => file = rest.next().map(PathBuf::from),
            "--log-format" => json = rest.next().map(String::as_str) == Some("json"),
            other => {
                eprintln!("fnmesh: unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(file) = file else {
        eprintln!("fnmesh: {verb} needs -c FILE\n{USAGE}");
        return ExitCode::from(2);
    };
    let config = match Config::load(&file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fnmesh: {e}");
            return ExitCode::from(1);
        }
    };
    match verb {
        "check" => {
            println!(
                "{}: ok, {} function(s): {}",
                file.display(),
                config.functions.len(),
                config
                    .functions
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            ExitCode::SUCCESS
        }
        "run" => crate::server::main(file, config, json),
        "reload" => reload(&config),
        other => {
            eprintln!("fnmesh: unknown command {other:?}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// `fnmesh reload`: the file is valid (it was just loaded); the running sidecar is asked, at the
/// admin address the file names, to read its file again, and its answer is printed.
fn reload(config: &Config) -> ExitCode {
    let Some(admin) = config.sidecar.admin else {
        eprintln!("fnmesh: reload needs sidecar.admin in the file (or send SIGHUP to the sidecar)");
        return ExitCode::from(1);
    };
    match post_reload(admin) {
        Ok((true, body)) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((false, body)) => {
            eprint!("fnmesh: {body}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("fnmesh: cannot reach the sidecar's admin address {admin}: {e}");
            ExitCode::from(1)
        }
    }
}

/// `POST /admin/reload`; gives whether it succeeded (200) and the answer's body.
fn post_reload(admin: std::net::SocketAddr) -> std::io::Result<(bool, String)> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(10);
    let mut s = std::net::TcpStream::connect_timeout(&admin, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "POST /admin/reload HTTP/1.1\r\nhost: {admin}\r\ncontent-length: 0\r\n\r\n"
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let ok = head.split_whitespace().nth(1) == Some("200");
    Ok((ok, body.to_owned()))
}
