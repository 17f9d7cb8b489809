//! The command line: `fnmesh run`, `fnmesh check`.

use std::{path::PathBuf, process::ExitCode};

use crate::config::Config;

const USAGE: &str = "usage:
  fnmesh run -c FILE [--log-format json]   serve the functions FILE configures
  fnmesh check -c FILE                     validate FILE without starting anything";

/// Runs the command line in `std::env::args`.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(verb) = args.first().map(String::as_str) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    if verb == "__watchdog" {
        return crate::watchdog::main();
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
        "run" => crate::run::main(config, json),
        other => {
            eprintln!("fnmesh: unknown command {other:?}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
