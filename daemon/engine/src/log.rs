//! The daemon's log: one line per event on stderr, filtered by a level that
//! a flag, the config file and SIGHUP set. Under journald (`JOURNAL_STREAM`
//! names our stderr) lines carry a `<N>` syslog priority and no timestamp,
//! since the journal adds both; otherwise they start with a UTC timestamp.
//! Before [`init`] (the offline commands) lines are plain `lfmd: …`.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

/// How much to log; each level includes the ones before it.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Error = 1,
    Warn = 2,
    #[default]
    Info = 3,
    Debug = 4,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }

    /// The syslog priority journald reads from a `<N>` prefix.
    fn syslog_priority(self) -> u8 {
        match self {
            Level::Error => 3,
            Level::Warn => 4,
            Level::Info => 6,
            Level::Debug => 7,
        }
    }

    fn from_u8(v: u8) -> Level {
        match v {
            1 => Level::Error,
            2 => Level::Warn,
            4 => Level::Debug,
            _ => Level::Info,
        }
    }
}

impl std::str::FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Level, String> {
        match s {
            "error" => Ok(Level::Error),
            "warn" | "warning" => Ok(Level::Warn),
            "info" => Ok(Level::Info),
            "debug" => Ok(Level::Debug),
            _ => Err(format!(
                "log level {s:?} is unknown; use error, warn, info or debug"
            )),
        }
    }
}

/// Where lines go and how they look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// `lfmd: message` (offline commands, before [`init`]).
    Plain = 0,
    /// `2026-11-29T18:20:00.123Z lfmd: message`.
    Timestamped = 1,
    /// `<6>message`, for journald.
    Journal = 2,
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
static STYLE: AtomicU8 = AtomicU8::new(Style::Plain as u8);

/// Chooses the style from the environment (journald or not) and sets the level.
pub fn init(level: Level) {
    let style = if stderr_is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref()) {
        Style::Journal
    } else {
        Style::Timestamped
    };
    STYLE.store(style as u8, Ordering::Relaxed);
    set_level(level);
}

pub fn set_level(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

pub fn level() -> Level {
    Level::from_u8(LEVEL.load(Ordering::Relaxed))
}

pub fn enabled(level: Level) -> bool {
    level <= self::level()
}

/// True when `JOURNAL_STREAM` (`DEV:INODE`) is our stderr: systemd sets it
/// for a service whose output goes to the journal, and a child that
/// redirected stderr must not believe it.
fn stderr_is_journal(journal_stream: Option<&str>) -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some((dev, ino)) = journal_stream.and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(m) => m.dev() == dev && m.ino() == ino,
        Err(_) => false,
    }
}

/// Formats one log record (all its lines) in `style`.
pub fn format(style: Style, level: Level, now: std::time::SystemTime, msg: &str) -> String {
    let tag = match level {
        Level::Error => "error: ",
        Level::Warn => "warning: ",
        Level::Info => "",
        Level::Debug => "debug: ",
    };
    let mut out = String::with_capacity(msg.len() + 40);
    for line in msg.lines() {
        match style {
            Style::Plain => out.push_str(&format!("lfmd: {tag}{line}\n")),
            Style::Timestamped => {
                out.push_str(&format!("{} lfmd: {tag}{line}\n", utc_timestamp(now)))
            }
            Style::Journal => out.push_str(&format!("<{}>{tag}{line}\n", level.syslog_priority())),
        }
    }
    out
}

/// Writes a record if `level` is enabled; whole lines in one write.
pub fn write(level: Level, args: fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let style = match STYLE.load(Ordering::Relaxed) {
        1 => Style::Timestamped,
        2 => Style::Journal,
        _ => Style::Plain,
    };
    let text = format(
        style,
        level,
        std::time::SystemTime::now(),
        &args.to_string(),
    );
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC), without a date crate.
pub fn utc_timestamp(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[macro_export]
macro_rules! error {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Error, format_args!($($t)*)) };
}
#[macro_export]
macro_rules! warn {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Warn, format_args!($($t)*)) };
}
#[macro_export]
macro_rules! info {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Info, format_args!($($t)*)) };
}
#[macro_export]
macro_rules! debug {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Debug, format_args!($($t)*)) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps_are_utc_civil_dates() {
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2024-02-29T23:59:59.250Z, a leap day.
        let t = UNIX_EPOCH + Duration::from_millis(1_709_251_199_250);
        assert_eq!(utc_timestamp(t), "2024-02-29T23:59:59.250Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_102_444_800);
        assert_eq!(utc_timestamp(t), "2100-01-01T00:00:00.000Z");
    }

    #[test]
    fn journal_lines_carry_priorities_and_no_timestamp() {
        let t = UNIX_EPOCH;
        assert_eq!(
            format(Style::Journal, Level::Warn, t, "a\nb"),
            "<4>warning: a\n<4>warning: b\n"
        );
        assert_eq!(
            format(Style::Journal, Level::Info, t, "ready"),
            "<6>ready\n"
        );
        assert_eq!(
            format(Style::Timestamped, Level::Error, t, "x"),
            "1970-01-01T00:00:00.000Z lfmd: error: x\n"
        );
        assert_eq!(format(Style::Plain, Level::Info, t, "x"), "lfmd: x\n");
    }

    #[test]
    fn journal_stream_must_name_our_stderr() {
        assert!(!stderr_is_journal(None));
        assert!(!stderr_is_journal(Some("garbage")));
        assert!(!stderr_is_journal(Some("1:1")));
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let fd = std::io::stderr().as_fd().try_clone_to_owned().unwrap();
        let m = std::fs::File::from(fd).metadata().unwrap();
        assert!(stderr_is_journal(Some(&format!("{}:{}", m.dev(), m.ino()))));
    }

    #[test]
    fn levels_parse_and_order() {
        assert_eq!("debug".parse::<Level>().unwrap(), Level::Debug);
        assert!("loud".parse::<Level>().unwrap_err().contains("error, warn"));
        assert!(Level::Error < Level::Debug);
    }
}
