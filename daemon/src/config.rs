//! `lfmd serve`'s settings: built-in defaults, then the config file
//! (`lfmd.toml`), then command-line flags. [`Settings`] is both the file's
//! schema (unknown keys and bad values are errors naming the key and line)
//! and the resolved result. `packaging/lfmd.toml` documents every key with
//! its default, and a test keeps it equal to [`Settings::default`].

use crate::log::Level;
use crate::serve::Listen;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The system service's config file.
pub const SYSTEM_CONFIG: &str = "/etc/lfmd/lfmd.toml";

/// `dbus`: the bus to serve on (`"session"`, `"system"`, an address such as
/// `"unix:path=/run/x/bus"`), or `"none"`. The bus itself is the API's
/// [`lfm_proto::dbus::Bus`], the type `--dbus` and `lfmctl --dbus=` parse too.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DbusSetting(pub Option<lfm_proto::dbus::Bus>);

impl std::str::FromStr for DbusSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<DbusSetting, String> {
        if s == "none" {
            return Ok(DbusSetting(None));
        }
        s.parse()
            .map(|b| DbusSetting(Some(b)))
            .map_err(|e| format!("{e}, or none"))
    }
}

impl std::fmt::Display for DbusSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_ref().map_or("none", |b| b.flag()))
    }
}

/// A byte count written as `"3GiB"`, `"512MiB"`, `"2G"`, `"4096"`; `"none"`
/// (or `"0"`) is no budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteSize(pub Option<u64>);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("none") {
            return Ok(ByteSize(None));
        }
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = (&t[..split], t[split..].trim());
        let bad =
            || format!("{s:?} is not a size; write e.g. \"3GiB\", \"512MiB\", \"2G\", or \"none\"");
        let n: f64 = num.parse().map_err(|_| bad())?;
        let mult: f64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kb" => 1e3,
            "m" | "mb" => 1e6,
            "g" | "gb" => 1e9,
            "t" | "tb" => 1e12,
            "kib" => 1024.0,
            "mib" => 1024f64.powi(2),
            "gib" => 1024f64.powi(3),
            "tib" => 1024f64.powi(4),
            _ => return Err(bad()),
        };
        let bytes = n * mult;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(bad());
        }
        Ok(ByteSize((bytes >= 1.0).then_some(bytes.round() as u64)))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("none"),
            Some(b) => {
                for (unit, m) in [("TiB", 1u64 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)] {
                    if b % m == 0 {
                        return write!(f, "{}{unit}", b / m);
                    }
                }
                write!(f, "{b}")
            }
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match ByteSizeRaw::deserialize(d)? {
            ByteSizeRaw::Int(n) => Ok(ByteSize((n > 0).then_some(n))),
            ByteSizeRaw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `memory_budget`: `"auto"` (follow what the host and cgroup have),
/// `"unlimited"` (or `"none"`), or a size such as `"3GiB"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryBudget(pub crate::engine::Budget);

impl std::str::FromStr for MemoryBudget {
    type Err = String;
    fn from_str(s: &str) -> Result<MemoryBudget, String> {
        use crate::engine::Budget;
        let t = s.trim();
        if t.eq_ignore_ascii_case("auto") {
            return Ok(MemoryBudget(Budget::Auto));
        }
        if t.eq_ignore_ascii_case("unlimited") {
            return Ok(MemoryBudget(Budget::Unlimited));
        }
        match t.parse::<ByteSize>() {
            Ok(ByteSize(None)) => Ok(MemoryBudget(Budget::Unlimited)),
            Ok(ByteSize(Some(b))) => Ok(MemoryBudget(Budget::Bytes(b))),
            Err(_) => Err(format!(
                "{s:?} is not a memory budget; write \"auto\", \"unlimited\", or a size such \
                 as \"3GiB\", \"512MiB\", \"2G\""
            )),
        }
    }
}

impl std::fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::engine::Budget;
        match self.0 {
            Budget::Auto => f.write_str("auto"),
            Budget::Unlimited => f.write_str("unlimited"),
            Budget::Bytes(b) => ByteSize(Some(b)).fmt(f),
        }
    }
}

impl<'de> Deserialize<'de> for MemoryBudget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match ByteSizeRaw::deserialize(d)? {
            ByteSizeRaw::Int(0) => Ok(MemoryBudget(crate::engine::Budget::Unlimited)),
            ByteSizeRaw::Int(n) => Ok(MemoryBudget(crate::engine::Budget::Bytes(n))),
            ByteSizeRaw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ByteSizeRaw {
    Int(u64),
    Text(String),
}

/// Settings written in the file as their text: serialized with `Display`
/// (and, for `from_str`, deserialized with `FromStr`, whose message names
/// what is wrong).
macro_rules! as_text {
    ($($t:ty),*; from_str: $($f:ty),*) => {
        $(impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        })*
        $(impl<'de> Deserialize<'de> for $f {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        })*
    };
}

as_text!(DbusSetting, ByteSize, MemoryBudget, Listen; from_str: DbusSetting, Listen);

fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if n == 0 {
        return Err(serde::de::Error::custom("must be at least 1"));
    }
    Ok(n)
}

fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Float(f64),
    }
    let s = match Raw::deserialize(d)? {
        Raw::Int(n) => n as f64,
        Raw::Float(f) => f,
    };
    if !(s.is_finite() && s >= 0.0) {
        return Err(serde::de::Error::custom(
            "must be a number of seconds, 0 or more",
        ));
    }
    Ok(s)
}

/// Everything `lfmd serve` can be told, with the built-in defaults.
/// Field names are the config file's keys (and the flags' names).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The GGUF model; none: `$LFMD_MODEL`, else the model directories.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
    /// Compute threads; 0 is one per core.
    pub threads: usize,
    /// Listeners (`unix:PATH`, `tcp:HOST:PORT`); empty: the default socket
    /// (or the sockets systemd passes).
    pub grpc: Vec<Listen>,
    /// HTTP listeners (OpenAI-compatible routes, `/metrics`, `/health`);
    /// empty: none (besides sockets systemd passes named `http`).
    pub http: Vec<Listen>,
    /// Allow `tcp:` listeners on non-loopback addresses.
    pub allow_remote: bool,
    /// The D-Bus bus to serve on, if any.
    pub dbus: DbusSetting,
    /// Group that owns the Unix sockets (mode 0660), if it exists; "" keeps
    /// the daemon's own group.
    pub socket_group: String,
    pub log_level: Level,
    /// Seconds running requests get to finish at SIGTERM/SIGINT.
    #[serde(deserialize_with = "seconds")]
    pub shutdown_grace: f64,
    /// Memory for the model's pages (expert paging).
    pub memory_budget: MemoryBudget,
    /// `mlock` the hottest experts up to this size; none: no locking.
    pub lock_experts: ByteSize,
    /// MoE layers ahead whose experts are predicted and prefetched.
    pub expert_lookahead: usize,
    /// Expert-paging I/O threads: expert loads in flight at once.
    #[serde(deserialize_with = "at_least_one")]
    pub expert_io_threads: usize,
    /// Sequences generated at once.
    #[serde(deserialize_with = "at_least_one")]
    pub max_concurrent: usize,
    /// Requests that may wait for a slot.
    pub queue: usize,
    /// Requests (running and waiting) one user may have; 0 is no limit.
    pub max_per_user: usize,
    /// Context tokens per sequence; 0 is 8192 capped at the model's.
    pub ctx: usize,
    #[serde(deserialize_with = "at_least_one")]
    pub prefill_chunk: usize,
    #[serde(deserialize_with = "at_least_one")]
    pub max_sessions: usize,
    /// Seconds before an idle chat session is dropped.
    pub session_idle: u64,
    /// Memory for prompt-prefix states (`none`: no prefix cache).
    pub prefix_cache: ByteSize,
    /// Share prefix-cache entries across users (default: each user's own).
    pub prefix_cache_shared: bool,
    /// `max_tokens` of requests that set none.
    #[serde(deserialize_with = "at_least_one")]
    pub max_tokens: usize,
}

impl Default for Settings {
    fn default() -> Self {
        let s = crate::scheduler::Config::default();
        Settings {
            model: None,
            threads: 0,
            grpc: Vec::new(),
            http: Vec::new(),
            allow_remote: false,
            dbus: DbusSetting(None),
            socket_group: "lfm".into(),
            log_level: Level::Info,
            shutdown_grace: 5.0,
            memory_budget: MemoryBudget::default(),
            lock_experts: ByteSize(None),
            expert_lookahead: crate::engine::PagingOptions::default().lookahead,
            expert_io_threads: crate::engine::PagingOptions::default().io_threads,
            max_concurrent: s.max_concurrent,
            queue: s.queue_capacity,
            max_per_user: s.max_per_user,
            ctx: 0,
            prefill_chunk: s.prefill_chunk,
            max_sessions: s.max_sessions,
            session_idle: s.session_idle.as_secs(),
            prefix_cache: ByteSize(Some(s.prefix_cache_bytes).filter(|&b| b > 0)),
            prefix_cache_shared: s.prefix_cache_shared,
            max_tokens: s.default_max_tokens,
        }
    }
}

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

impl Settings {
    /// The engine's expert-paging options from these settings.
    pub fn paging(&self) -> crate::engine::PagingOptions {
        crate::engine::PagingOptions {
            budget: self.memory_budget.0,
            lock_bytes: self.lock_experts.0.unwrap_or(0),
            lookahead: self.expert_lookahead,
            predict_margin: crate::engine::PagingOptions::default().predict_margin,
            io_threads: self.expert_io_threads,
        }
    }

    /// Parses a config file's text; errors name `path`, the line and key.
    pub fn parse(text: &str, path: &Path) -> Result<Settings, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(0, |s| s.start).min(text.len());
            let line = text[..at].matches('\n').count() + 1;
            let message = e.message().trim().to_owned();
            let key = key_of(&message)
                .or_else(|| key_at(text, at))
                .unwrap_or_else(|| "(file)".into());
            ConfigError::Invalid {
                path: path.into(),
                line,
                key,
                message,
            }
        })
    }

    /// Reads `path`; a missing file is the defaults when `required` is false.
    pub fn load(path: &Path, required: bool) -> Result<Settings, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Settings::parse(&text, path),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Settings::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.into(),
                source,
            }),
        }
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_grace)
    }

    /// The settings SIGHUP applies (see README), as the scheduler takes them.
    pub fn limits(&self) -> crate::scheduler::Limits {
        crate::scheduler::Limits {
            max_concurrent: self.max_concurrent,
            queue_capacity: self.queue,
            max_per_user: self.max_per_user,
            prefill_chunk: self.prefill_chunk,
            default_max_tokens: self.max_tokens,
        }
    }

    /// Keys whose change needs a restart and that differ from `other`.
    pub fn restart_only_changes(&self, other: &Settings) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut check = |name, differs: bool| {
            if differs {
                v.push(name);
            }
        };
        check("model", self.model != other.model);
        check("threads", self.threads != other.threads);
        check("grpc", self.grpc != other.grpc);
        check("http", self.http != other.http);
        check("allow_remote", self.allow_remote != other.allow_remote);
        check("dbus", self.dbus != other.dbus);
        check("socket_group", self.socket_group != other.socket_group);
        check("memory_budget", self.memory_budget != other.memory_budget);
        check("lock_experts", self.lock_experts != other.lock_experts);
        check(
            "expert_lookahead",
            self.expert_lookahead != other.expert_lookahead,
        );
        check(
            "expert_io_threads",
            self.expert_io_threads != other.expert_io_threads,
        );
        check("ctx", self.ctx != other.ctx);
        check("max_sessions", self.max_sessions != other.max_sessions);
        check("session_idle", self.session_idle != other.session_idle);
        check("prefix_cache", self.prefix_cache != other.prefix_cache);
        check(
            "prefix_cache_shared",
            self.prefix_cache_shared != other.prefix_cache_shared,
        );
        v
    }
}

/// The key a serde message names (`unknown field `x``, `missing field `x``).
fn key_of(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("missing field `"))?;
    Some(rest.split('`').next()?.to_owned())
}

/// The key of the `key = value` line holding byte `at`.
fn key_at(text: &str, at: usize) -> Option<String> {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty() && !key.starts_with('#')).then(|| key.to_owned())
}

/// Where the config file is looked for when `--config` is not given: the
/// system service's, or the user's `$XDG_CONFIG_HOME/lfmd/lfmd.toml`
/// (default `~/.config/lfmd/lfmd.toml`).
pub fn default_path(system: bool, env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if system {
        return Some(SYSTEM_CONFIG.into());
    }
    match env("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        Some(d) => Some(PathBuf::from(d).join("lfmd/lfmd.toml")),
        None => env("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".config/lfmd/lfmd.toml")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        Settings::parse(text, Path::new("lfmd.toml"))
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn the_packaged_example_is_the_defaults_and_names_every_key() {
        let text = include_str!("../../packaging/lfmd.toml");
        assert_eq!(parse(text).unwrap(), Settings::default());
        // Every key is written out (commented out only when its default is
        // "not set"), so the example documents them all.
        let defaults = toml::to_string(&Settings::default()).unwrap();
        let keys: Vec<&str> = defaults
            .lines()
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
            .chain(["model"])
            .collect();
        assert_eq!(keys.len(), 23, "{defaults}");
        for key in keys {
            let set = text.lines().any(|l| l.starts_with(&format!("{key} = ")));
            let commented = text.lines().any(|l| l.starts_with(&format!("# {key} = ")));
            assert!(set || (key == "model" && commented), "{key} missing");
        }
    }

    #[test]
    fn errors_name_the_key_and_the_line() {
        let e = err("threads = 2\n\nmax_concurent = 4\n");
        assert!(
            e.starts_with("lfmd.toml:3: max_concurent: unknown field"),
            "{e}"
        );
        let e = err("# c\nqueue = \"lots\"\n");
        assert!(e.starts_with("lfmd.toml:2: queue: "), "{e}");
        let e = err("max_concurrent = 0\n");
        assert!(
            e.starts_with("lfmd.toml:1: max_concurrent: must be at least 1"),
            "{e}"
        );
        let e = err("threads = 1\nlog_level = \"loud\"\n");
        assert!(
            e.starts_with("lfmd.toml:2: log_level: unknown variant"),
            "{e}"
        );
        let e = err("memory_budget = \"3 parsecs\"\n");
        assert!(e.starts_with("lfmd.toml:1: memory_budget: "), "{e}");
        let e = err("grpc = [\"unix:/a\", \"http://x\"]\n");
        assert!(e.starts_with("lfmd.toml:1: grpc: "), "{e}");
        let e = err("shutdown_grace = -1\n");
        assert!(e.contains("shutdown_grace"), "{e}");
        let e = err("expert_io_threads = 0\n");
        assert!(
            e.starts_with("lfmd.toml:1: expert_io_threads: must be at least 1"),
            "{e}"
        );
        assert_eq!(
            parse("expert_io_threads = 2\n")
                .unwrap()
                .paging()
                .io_threads,
            2
        );
        let e = err("dbus = \"both\"\n");
        assert!(e.starts_with("lfmd.toml:1: dbus: "), "{e}");
        let e = err("prefix_cache = \"lots\"\n");
        assert!(e.starts_with("lfmd.toml:1: prefix_cache: "), "{e}");
        assert!(e.contains("512MiB"), "says how to write a size: {e}");
        let e = err("prefix_cache_shared = \"yes\"\n");
        assert!(e.starts_with("lfmd.toml:1: prefix_cache_shared: "), "{e}");
        for (text, want) in [
            ("\"none\"", None),
            ("0", None),
            ("\"64MiB\"", Some(64 << 20)),
        ] {
            let s = parse(&format!("prefix_cache = {text}\n")).unwrap();
            assert_eq!(s.prefix_cache.0, want, "{text}");
        }
        let e = err("threads = \n");
        assert!(e.starts_with("lfmd.toml:1: "), "{e}");
    }

    #[test]
    fn values_parse() {
        let s = parse(
            "model = \"/m.gguf\"\ngrpc = [\"unix:/run/x.sock\", \"tcp:127.0.0.1:5000\"]\n\
             memory_budget = \"3GiB\"\nshutdown_grace = 2\ndbus = \"system\"\nlog_level = \"debug\"\n",
        )
        .unwrap();
        assert_eq!(s.model.as_deref(), Some(Path::new("/m.gguf")));
        assert_eq!(s.grpc.len(), 2);
        assert_eq!(
            s.memory_budget,
            MemoryBudget(crate::engine::Budget::Bytes(3 << 30))
        );
        for (text, want) in [
            ("auto", crate::engine::Budget::Auto),
            ("unlimited", crate::engine::Budget::Unlimited),
            ("none", crate::engine::Budget::Unlimited),
            ("1.5GiB", crate::engine::Budget::Bytes(3 << 29)),
        ] {
            let b: MemoryBudget = text.parse().unwrap();
            assert_eq!(b.0, want, "{text}");
            assert_eq!(b.to_string().parse::<MemoryBudget>().unwrap(), b);
        }
        assert!("lots".parse::<MemoryBudget>().unwrap_err().contains("auto"));
        assert_eq!(
            (s.shutdown_grace, s.dbus, s.log_level),
            (
                2.0,
                DbusSetting(Some(lfm_proto::dbus::Bus::System)),
                Level::Debug
            )
        );
        for (text, want) in [
            ("none", None),
            ("session", Some(lfm_proto::dbus::Bus::Session)),
            (
                "unix:path=/run/x/bus",
                Some(lfm_proto::dbus::Bus::Address("unix:path=/run/x/bus".into())),
            ),
        ] {
            let b: DbusSetting = text.parse().unwrap();
            assert_eq!(b.0, want, "{text}");
            assert_eq!(b.to_string(), text);
            let file = parse(&format!("dbus = \"{text}\"\n")).unwrap();
            assert_eq!(file.dbus, b, "{text}");
        }
        for (text, bytes) in [
            ("512MiB", Some(512 << 20)),
            ("2G", Some(2_000_000_000)),
            ("1.5 GiB", Some(3 << 29)),
            ("4096", Some(4096)),
            ("none", None),
            ("0", None),
        ] {
            assert_eq!(text.parse::<ByteSize>().unwrap().0, bytes, "{text}");
        }
        for bad in ["", "GiB", "3 XB", "-1G", "1e400"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
        assert_eq!(ByteSize(Some(3 << 30)).to_string(), "3GiB");
    }

    #[test]
    fn default_paths_follow_xdg() {
        let env = |k: &str| (k == "HOME").then(|| "/home/u".to_owned());
        assert_eq!(
            default_path(false, env),
            Some(PathBuf::from("/home/u/.config/lfmd/lfmd.toml"))
        );
        let env = |k: &str| (k == "XDG_CONFIG_HOME").then(|| "/x".to_owned());
        assert_eq!(
            default_path(false, env),
            Some(PathBuf::from("/x/lfmd/lfmd.toml"))
        );
        assert_eq!(
            default_path(true, env),
            Some(PathBuf::from("/etc/lfmd/lfmd.toml"))
        );
    }

    #[test]
    fn a_missing_default_file_is_fine_and_a_missing_given_one_is_not() {
        let p = Path::new("/nonexistent/lfmd.toml");
        assert_eq!(Settings::load(p, false).unwrap(), Settings::default());
        assert!(Settings::load(p, true).is_err());
    }
}
