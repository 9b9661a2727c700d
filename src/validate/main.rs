//! `oauth2-cc validate FILE...`: the filter's configuration check as a command, for CI pipelines
//! and admission checks. Each FILE (`-` is stdin) holds the plugin configuration JSON as the filter
//! receives it; it goes through the same `config::parse`, with the same environment lookup
//! (`{"env": "NAME"}` reads this process's environment, as the hosts read the VM's or Envoy's), and
//! the line printed is the one the hosts log at load. Exit status: 0 when every file is accepted,
//! 1 when one is refused, 2 on a usage or read error.

use std::io::{Read, Write};
use std::process::ExitCode;

use oauth2_cc_core::config;

const USAGE: &str = "usage: oauth2-cc validate FILE... (FILE '-' reads stdin)

Checks oauth2-cc plugin configurations (JSON) with the filter's own parser and prints what the
filter logs at load: 'configured N profile(s): ...' or 'configuration rejected: <field>: <reason>'.
{\"env\": \"NAME\"} secrets are read from this process's environment.
Exit status: 0 all accepted, 1 one refused, 2 usage or read error.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.split_first() {
        Some((command, files)) if command == "validate" && !files.is_empty() => validate_all(files),
        Some((flag, _)) if flag == "-h" || flag == "--help" || flag == "help" => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// Validates each file; with more than one, each line starts with the file's name.
fn validate_all(files: &[String]) -> ExitCode {
    let mut status = ExitCode::SUCCESS;
    let named = files.len() > 1;
    for file in files {
        let label = if named { format!("{file}: ") } else { String::new() };
        let bytes = match read(file) {
            Ok(bytes) => bytes,
            Err(error) => {
                eprintln!("{label}cannot read {file}: {error}");
                return ExitCode::from(2);
            }
        };
        match config::parse(&bytes, &|name| std::env::var(name).ok()) {
            Ok(config) => println!("{label}{}", config::configured_message(&config)),
            Err(error) => {
                // Earlier verdicts first, when both streams go to one place.
                let _ = std::io::stdout().flush();
                eprintln!("{label}{}", config::rejected_message(&error));
                status = ExitCode::from(1);
            }
        }
    }
    status
}

fn read(file: &str) -> std::io::Result<Vec<u8>> {
    if file == "-" {
        let mut bytes = Vec::new();
        std::io::stdin().read_to_end(&mut bytes)?;
        Ok(bytes)
    } else {
        std::fs::read(file)
    }
}
