//! The command line (clap): `fnmesh run`, `fnmesh check`, `fnmesh reload`, `fnmesh status`,
//! `fnmesh call`, `fnmesh idl`.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{config::Config, server::LogFormat};

/// fnmesh: an RPC-native function mesh sidecar. It serves Thrift (TTHeader, Framed, unframed)
/// and gRPC functions on one port, starts their instances on demand and stops them when idle,
/// and applies the policy file's governance.
#[derive(Debug, Parser)]
#[command(name = "fnmesh", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the functions FILE configures, until SIGTERM or SIGINT (SIGHUP reloads FILE).
    Run {
        #[command(flatten)]
        config: ConfigFile,
        /// How logs are written to stderr (RUST_LOG filters them).
        #[arg(long, value_enum, default_value_t = LogFormatArg::Text)]
        log_format: LogFormatArg,
    },
    /// Validate FILE without starting anything: errors name the key and the line.
    Check {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Validate FILE, then have the sidecar serving it (at its `sidecar.admin` address) read
    /// it again; prints what changed.
    Reload {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Show what a running sidecar is doing: per function, instances, calls in flight and
    /// queued, calls per second, p50/p99 and success over the last minute, breakers, the last
    /// cold start; and the registry.
    Status {
        /// The policy file of the sidecar (its `sidecar.admin` address is read).
        #[arg(
            short,
            long = "config",
            value_name = "FILE",
            conflicts_with = "admin",
            required_unless_present = "admin"
        )]
        config: Option<PathBuf>,
        /// The sidecar's admin address, instead of a policy file.
        #[arg(long, value_name = "ADDR")]
        admin: Option<std::net::SocketAddr>,
        /// Refresh every 2 s until interrupted.
        #[arg(long)]
        watch: bool,
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Call FUNCTION's METHOD with JSON arguments (or `-` for stdin): a real TTHeader call
    /// built from the function's IDL, sent to the sidecar; prints the reply as JSON. The exit
    /// status says how it ended (docs/gateway.md).
    Call {
        /// The policy file: the function's IDL, and its `listen` address.
        #[arg(
            short,
            long = "config",
            value_name = "FILE",
            required_unless_present = "idl",
            conflicts_with = "idl"
        )]
        config: Option<PathBuf>,
        /// Where to send it, instead of the file's `sidecar.listen` (with --idl: required).
        #[arg(long, value_name = "HOST:PORT", required_unless_present = "config")]
        addr: Option<std::net::SocketAddr>,
        /// Without a policy file: the `.thrift` IDL to build the call from (any Thrift server
        /// at --addr, a Kitex or Volo one too).
        #[arg(long, value_name = "FILE")]
        idl: Option<PathBuf>,
        /// With --idl: the IDL service (default: the IDL's only one).
        #[arg(long, value_name = "NAME", requires = "idl")]
        service: Option<String>,
        /// The call's deadline (sent as its RPC timeout).
        #[arg(long, default_value = "10s", value_parser = crate::config::parse_duration)]
        timeout: std::time::Duration,
        /// Thrift: the protocol to write the call in, `binary` or `compact` (default: the
        /// function's `thrift_protocol`, else binary).
        #[arg(long, value_name = "PROTOCOL", value_parser = ["binary", "compact"])]
        protocol: Option<String>,
        /// Queue the call instead (`[async]`, docs/async.md): prints its id; `--timeout` is
        /// each attempt's deadline.
        #[arg(long = "async", conflicts_with = "idl")]
        queue: bool,
        function: String,
        method: String,
        /// The arguments as JSON (`-`: read from stdin; none: `{}`).
        json: Option<String>,
    },
    /// Print the services, methods and types each function (or FUNCTION) serves.
    Idl {
        #[command(flatten)]
        config: ConfigFile,
        function: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
struct ConfigFile {
    /// The policy file (fnmesh.toml).
    #[arg(short, long = "config", value_name = "FILE")]
    config: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    /// Human-readable lines (coloured only on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// Runs the command line in `std::env::args`.
pub fn main() -> ExitCode {
    // The watchdog process the sidecar starts for itself: not a user command.
    if std::env::args().nth(1).as_deref() == Some("__watchdog") {
        return crate::instances::watchdog::main();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS // --help, --version
            };
        }
    };
    match cli.command {
        Command::Run { config, log_format } => {
            let Some(loaded) = load(&config.config) else {
                return ExitCode::from(1);
            };
            let logs = match log_format {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            };
            crate::server::main(config.config, loaded, logs)
        }
        Command::Check { config } => match load(&config.config) {
            Some(loaded) => {
                let names: Vec<&str> = loaded.functions.iter().map(|f| f.name.as_str()).collect();
                println!(
                    "{}: ok, {} function(s): {}",
                    config.config.display(),
                    names.len(),
                    names.join(", ")
                );
                ExitCode::SUCCESS
            }
            None => ExitCode::from(1),
        },
        Command::Reload { config } => match load(&config.config) {
            Some(loaded) => reload(&loaded, &config.config),
            None => ExitCode::from(1),
        },
        Command::Status {
            config,
            admin,
            watch,
            json,
        } => {
            let admin = match (admin, config) {
                (Some(admin), _) => admin,
                (None, Some(file)) => match load(&file).map(|c| c.sidecar.admin) {
                    Some(Some(admin)) => admin,
                    Some(None) => {
                        eprintln!("fnmesh: {} sets no sidecar.admin", file.display());
                        return ExitCode::from(1);
                    }
                    None => return ExitCode::from(1),
                },
                (None, None) => return ExitCode::from(2),
            };
            crate::status::main(admin, watch, json)
        }
        Command::Call {
            config,
            addr,
            idl,
            service,
            timeout,
            protocol,
            queue,
            function,
            method,
            json,
        } => {
            let target = match (config, idl, addr) {
                (Some(file), _, addr) => match load(&file) {
                    Some(loaded) => crate::call::Target::of_function(&loaded, &function, addr),
                    None => return ExitCode::from(1),
                },
                (None, Some(idl), Some(addr)) => {
                    crate::call::Target::of_idl(addr, &idl, service.as_deref())
                }
                _ => return ExitCode::from(2),
            };
            match target {
                Ok(t) if queue => {
                    crate::call::enqueue(t.addr, timeout, &function, &method, json.as_deref())
                }
                Ok(t) => call(t, protocol, timeout, &function, &method, json.as_deref()),
                Err(code) => code,
            }
        }
        Command::Idl { config, function } => match load(&config.config) {
            Some(loaded) => crate::call::idl(&loaded, function.as_deref()),
            None => ExitCode::from(1),
        },
    }
}

/// The policy file, or `None` after printing why it is not valid.
fn load(path: &std::path::Path) -> Option<Config> {
    Config::load(path)
        .map_err(|e| eprintln!("fnmesh: {e}"))
        .ok()
}

/// `fnmesh reload`: the file is valid (it was just loaded); the running sidecar is asked, at the
/// admin address the file names, to read its file again, and its answer is printed. The request
/// names the file: a sidecar that serves another one refuses, saying which it serves.
fn reload(config: &Config, file: &std::path::Path) -> ExitCode {
    let Some(admin) = config.sidecar.admin else {
        eprintln!("fnmesh: reload needs sidecar.admin in the file (or send SIGHUP to the sidecar)");
        return ExitCode::from(1);
    };
    let file = std::fs::canonicalize(file).unwrap_or_else(|_| file.into());
    match post_reload(admin, &file) {
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

/// `POST /admin/reload`; gives whether it succeeded (200) and the answer's body. One blocking
/// request over std's TCP: no runtime is needed for it.
fn post_reload(
    admin: std::net::SocketAddr,
    file: &std::path::Path,
) -> std::io::Result<(bool, String)> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(10);
    let mut s = std::net::TcpStream::connect_timeout(&admin, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "POST /admin/reload HTTP/1.1\r\nhost: {admin}\r\n{}: {}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        crate::admin::RELOAD_FILE_HEADER,
        crate::admin::percent_encode(file),
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let ok = head.split_whitespace().nth(1) == Some("200");
    Ok((ok, body.to_owned()))
}

/// `fnmesh call` to `target`, in `protocol` when given.
fn call(
    mut target: crate::call::Target,
    protocol: Option<String>,
    timeout: std::time::Duration,
    function: &str,
    method: &str,
    json: Option<&str>,
) -> ExitCode {
    use fnmesh_idl::thrift_json::Protocol as Thrift;
    match protocol.as_deref() {
        Some("compact") => target.thrift_protocol = Thrift::Compact,
        Some(_) => target.thrift_protocol = Thrift::Binary,
        None => {}
    }
    crate::call::main(&target, timeout, function, method, json)
}
