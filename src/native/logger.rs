//! The `log` crate's records go to Envoy's log (component `dynamic_modules`), each line prefixed
//! `oauth2_cc:`. Messages never carry a secret: the core's log lines are written for that.

use crate::native::abi::{self, Level};

struct EnvoyLogger;

static LOGGER: EnvoyLogger = EnvoyLogger;

/// Installs the logger (once per process; later calls keep the first).
pub fn install() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
    }
}

fn level_of(level: log::Level) -> Level {
    match level {
        log::Level::Error => Level::Error,
        log::Level::Warn => Level::Warn,
        log::Level::Info => Level::Info,
        log::Level::Debug => Level::Debug,
        log::Level::Trace => Level::Trace,
    }
}

impl log::Log for EnvoyLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        abi::log_enabled(level_of(metadata.level()))
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = level_of(record.level());
        if abi::log_enabled(level) {
            abi::log(level, &format!("oauth2_cc: {}", record.args()));
        }
    }

    fn flush(&self) {}
}
