//! `oauth2-cc validate [--wasm] FILE...`: the filter's configuration check as a command, for CI
//! pipelines and admission checks. Each FILE (`-` is stdin) holds the plugin configuration JSON as
//! the filter receives it; it goes through the same `config::parse_with` the dynamic module runs
//! (`{"env": "NAME"}` reads this process's environment, `{"file": "/path"}` reads the file), or with
//! `--wasm` the `config::parse` of the proxy-wasm build, which reads no files. The line printed is
//! the one the hosts log at load. Exit status: 0 when every file is accepted, 1 when one is
//! refused, 2 on a usage or read error.

use std::io::{Read, Write};
use std::process::ExitCode;

use oauth2_cc_core::config;

const USAGE: &str = "usage: oauth2-cc validate [--wasm] FILE... (FILE '-' reads stdin)

Checks oauth2-cc plugin configurations (JSON) with the filter's own parser and prints what the
filter logs at load: 'configured N profile(s): ...' or 'configuration rejected: <field>: <reason>'.
{\"env\": \"NAME\"} secrets are read from this process's environment and {\"file\": \"/path\"}
secrets from the file, as the dynamic module reads them; --wasm checks as the proxy-wasm build,
which refuses secret files.
Exit status: 0 all accepted, 1 one refused, 2 usage or read error.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.split_first() {
        Some((command, args)) if command == "validate" => match args.split_first() {
            Some((flag, files)) if flag == "--wasm" && !files.is_empty() => validate_all(files, Host::Wasm),
            Some(_) if !args[0].starts_with("--") => validate_all(args, Host::Native),
            _ => usage_error(),
        },
        Some((flag, _)) if flag == "-h" || flag == "--help" || flag == "help" => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => usage_error(),
    }
}

fn usage_error() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(2)
}

/// Which host's configuration check to run: they differ only in reading secret files.
#[derive(Clone, Copy)]
enum Host {
    Native,
    Wasm,
}

fn check(bytes: &[u8], host: Host) -> Result<config::Config, config::ConfigError> {
    let env = |name: &str| std::env::var(name).ok();
    match host {
        Host::Wasm => config::parse(bytes, &env),
        Host::Native => {
            // The dynamic module's reader: the error names the kind, never the content.
            let read = |path: &str| std::fs::read_to_string(path).map_err(|error| error.kind().to_string());
            config::parse_with(bytes, config::SecretSources { env: &env, file: Some(&read) })
        }
    }
}

/// Validates each file; with more than one, each line starts with the file's name.
fn validate_all(files: &[String], host: Host) -> ExitCode {
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
        match check(&bytes, host) {
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
