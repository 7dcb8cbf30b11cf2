//! This process's memory as the kernel counts it (`/proc/self/status`):
//! resident anonymous memory (what lfmd allocated) and resident file pages
//! (the model mapping, which the kernel can drop and re-read at will).

use serde::Serialize;
use std::ops::Range;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Memory {
    pub rss_bytes: u64,
    pub rss_anon_bytes: u64,
    pub rss_file_bytes: u64,
    pub peak_rss_bytes: u64,
}

/// Parses `/proc/self/status`; `None` where it is unavailable (not Linux).
pub fn memory() -> Option<Memory> {
    parse(&std::fs::read_to_string("/proc/self/status").ok()?)
}

fn parse(status: &str) -> Option<Memory> {
    let kb = |key: &str| keyed_number(status, key).map(|k| k * 1024);
    Some(Memory {
        rss_bytes: kb("VmRSS:")?,
        rss_anon_bytes: kb("RssAnon:").unwrap_or(0),
        rss_file_bytes: kb("RssFile:").unwrap_or(0),
        peak_rss_bytes: kb("VmHWM:").unwrap_or(0),
    })
}

/// Memory the system could give this process, as seen at the host and at
/// the process's memory cgroup (v1 or v2), whichever is tighter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Headroom {
    /// `MemAvailable` from `/proc/meminfo`.
    pub host_available_bytes: u64,
    /// The cgroup's limit, when it has one.
    pub cgroup_limit_bytes: Option<u64>,
    /// The cgroup's usage minus its page cache (what it cannot shed).
    pub cgroup_unreclaimable_bytes: Option<u64>,
}

impl Headroom {
    /// Bytes of file pages (our mapping included) that fit without pushing
    /// out anonymous memory: the host's available memory, or the cgroup's
    /// limit minus what it cannot shed, whichever is less.
    pub fn file_pages_bytes(&self) -> u64 {
        match (self.cgroup_limit_bytes, self.cgroup_unreclaimable_bytes) {
            (Some(l), Some(u)) => self.host_available_bytes.min(l.saturating_sub(u)),
            _ => self.host_available_bytes,
        }
    }
}

/// Reads [`Headroom`]; `None` without `/proc/meminfo`.
pub fn headroom() -> Option<Headroom> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let host = keyed_number(&meminfo, "MemAvailable:")? * 1024;
    let cg = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| cgroup_memory(&c, |p| std::fs::read_to_string(p).ok()));
    Some(Headroom {
        host_available_bytes: host,
        cgroup_limit_bytes: cg.map(|c| c.0),
        cgroup_unreclaimable_bytes: cg.map(|c| c.1),
    })
}

/// The number on the line of `text` that starts with `key`
/// (`MemAvailable:   123 kB`, `read_bytes: 8192`), a `kB` unit dropped: the
/// caller knows the unit of its key.
fn keyed_number(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// (limit, usage minus page cache) of this process's memory cgroup, when it
/// has a limit. `read` reads a file (a parameter so tests can fake /sys).
fn cgroup_memory(proc_cgroup: &str, read: impl Fn(&str) -> Option<String>) -> Option<(u64, u64)> {
    let stat_key = |stat: &str, key: &str| -> Option<u64> {
        stat.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
    };
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" && ctrls.is_empty() {
            // cgroup v2: memory.max ("max" = none), memory.current, memory.stat "file".
            let dir = format!("/sys/fs/cgroup{path}");
            let max = read(&format!("{dir}/memory.max"))?;
            let limit: u64 = max.trim().parse().ok()?;
            let usage: u64 = read(&format!("{dir}/memory.current"))?
                .trim()
                .parse()
                .ok()?;
            let file = stat_key(&read(&format!("{dir}/memory.stat"))?, "file").unwrap_or(0);
            return Some((limit, usage.saturating_sub(file)));
        }
        if ctrls.split(',').any(|c| c == "memory") {
            // cgroup v1. Inside a cgroup namespace the mount shows our own
            // group at the root; otherwise at the path.
            for dir in [
                format!("/sys/fs/cgroup/memory{path}"),
                "/sys/fs/cgroup/memory".to_owned(),
            ] {
                let Some(l) = read(&format!("{dir}/memory.limit_in_bytes")) else {
                    continue;
                };
                let limit: u64 = l.trim().parse().ok()?;
                // "No limit" is a huge page-rounded i64::MAX.
                if limit >= 1 << 62 {
                    return None;
                }
                let usage: u64 = read(&format!("{dir}/memory.usage_in_bytes"))?
                    .trim()
                    .parse()
                    .ok()?;
                let stat = read(&format!("{dir}/memory.stat"))?;
                let cache = stat_key(&stat, "total_cache")
                    .or_else(|| stat_key(&stat, "cache"))
                    .unwrap_or(0);
                return Some((limit, usage.saturating_sub(cache)));
            }
            return None;
        }
    }
    None
}

/// The share of the last 10 s in which some task waited for memory
/// (`/proc/pressure/memory`, "some avg10", percent). `None` without PSI.
pub fn memory_pressure() -> Option<f32> {
    psi_some_avg10(&std::fs::read_to_string("/proc/pressure/memory").ok()?)
}

fn psi_some_avg10(text: &str) -> Option<f32> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?
        .parse()
        .ok()
}

/// Major page faults of this process so far (`/proc/self/stat` field 12).
pub fn major_faults() -> Option<u64> {
    stat_major_faults(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// Bytes this process (every thread) has had read from storage so far:
/// `read_bytes` of `/proc/self/io`, what the block layer fetched for it,
/// readahead included (a page-cache hit reads nothing).
pub fn storage_read_bytes() -> Option<u64> {
    keyed_number(
        &std::fs::read_to_string("/proc/self/io").ok()?,
        "read_bytes:",
    )
}

/// Major page faults of this process's threads whose name does not start
/// with `skip` (`/proc/self/task/*/stat` field 12): the faults of compute
/// threads, leaving out those of helper threads whose job is to fault pages
/// in (the expert pager's).
pub fn major_faults_except(skip: &str) -> Option<u64> {
    let mut sum = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.starts_with(skip) {
            continue;
        }
        // A thread that ended meanwhile counts nothing.
        if let Some(n) = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|stat| stat_major_faults(&stat))
        {
            sum += n;
        }
    }
    Some(sum)
}

fn stat_major_faults(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces: fields resume after ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(9)?.parse().ok()
}

/// One mapping (VMA) of this process, from `/proc/self/smaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vma {
    pub start: usize,
    pub end: usize,
    /// Resident bytes (pages of the file this process has mapped in).
    pub rss: u64,
    /// Bytes mapped with huge (PMD) entries: `FilePmdMapped` plus
    /// `AnonHugePages`.
    pub huge_mapped: u64,
    /// Advised `MADV_HUGEPAGE` (flag `hg`).
    pub huge_advised: bool,
}

/// The mappings of this process that start inside `range` (one file
/// mapping becomes several once parts of it get different advice).
pub fn mappings(range: Range<usize>) -> Option<Vec<Vma>> {
    Some(smaps_vmas(
        &std::fs::read_to_string("/proc/self/smaps").ok()?,
        range,
    ))
}

/// Resident bytes of the mapping `addr..addr + len`, over all its pieces.
pub fn mapping_rss(addr: usize, len: usize) -> Option<u64> {
    let vmas = mappings(addr..addr + len)?;
    (!vmas.is_empty()).then(|| vmas.iter().map(|v| v.rss).sum())
}

/// A mapping's first line ("7f00-7f10 r--s ..."), not one of its fields.
fn is_smaps_header(line: &str) -> bool {
    line.split_whitespace()
        .next()
        .is_some_and(|t| t.contains('-') && t.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
}

fn smaps_vmas(smaps: &str, range: Range<usize>) -> Vec<Vma> {
    let kb = |v: &str| {
        v.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .map_or(0, |k| k * 1024)
    };
    let mut out: Vec<Vma> = Vec::new();
    let mut inside = false;
    for line in smaps.lines() {
        if is_smaps_header(line) {
            let span = line.split_whitespace().next().unwrap_or("");
            let (a, b) = span.split_once('-').unwrap_or(("", ""));
            let (Ok(start), Ok(end)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            else {
                inside = false;
                continue;
            };
            inside = range.contains(&start);
            if inside {
                out.push(Vma {
                    start,
                    end,
                    rss: 0,
                    huge_mapped: 0,
                    huge_advised: false,
                });
            }
            continue;
        }
        let Some(v) = out.last_mut().filter(|_| inside) else {
            continue;
        };
        let (key, val) = line.split_once(':').unwrap_or((line, ""));
        match key {
            "Rss" => v.rss = kb(val),
            "FilePmdMapped" | "AnonHugePages" => v.huge_mapped += kb(val),
            "VmFlags" => v.huge_advised = val.split_whitespace().any(|f| f == "hg"),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_faults_are_field_12_after_the_name() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194304 100 0 7 0 5 6";
        assert_eq!(stat_major_faults(stat), Some(7));
        assert_eq!(stat_major_faults("42 (x"), None);
        // Every live thread's count is in the process's (which also keeps
        // those of threads that ended); skipping every name leaves none.
        let live = major_faults_except("\u{0}").unwrap();
        assert!(live <= major_faults().unwrap());
        assert_eq!(major_faults_except(""), Some(0));
    }

    #[test]
    fn storage_reads_come_from_read_bytes() {
        let io = "rchar: 5\nwchar: 6\nsyscr: 1\nsyscw: 1\nread_bytes: 8192\nwrite_bytes: 0\ncancelled_write_bytes: 0\n";
        assert_eq!(keyed_number(io, "read_bytes:"), Some(8192));
        assert_eq!(keyed_number(io, "rchar:"), Some(5));
        assert_eq!(keyed_number("read_bytes: x\n", "read_bytes:"), None);
        assert!(storage_read_bytes().is_some(), "/proc/self/io is readable");
    }

    #[test]
    fn parses_kernel_status_lines() {
        let s = "Name:\tlfmd\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nRssAnon:\t   256 kB\nRssFile:\t   768 kB\n";
        assert_eq!(
            parse(s),
            Some(Memory {
                rss_bytes: 1 << 20,
                rss_anon_bytes: 256 << 10,
                rss_file_bytes: 768 << 10,
                peak_rss_bytes: 2 << 20
            })
        );
        assert_eq!(parse("Name:\tx\n"), None);
        #[cfg(target_os = "linux")]
        assert!(memory().is_some_and(|m| m.rss_bytes > 0));
    }

    #[test]
    fn reads_cgroup_v1_and_v2_limits() {
        let files = |v: &'static [(&'static str, &'static str)]| {
            move |p: &str| v.iter().find(|(k, _)| *k == p).map(|(_, c)| c.to_string())
        };
        let v2 = files(&[
            ("/sys/fs/cgroup/svc/memory.max", "3221225472\n"),
            ("/sys/fs/cgroup/svc/memory.current", "2000\n"),
            (
                "/sys/fs/cgroup/svc/memory.stat",
                "anon 500\nfile 1500\nfile_mapped 10\n",
            ),
        ]);
        assert_eq!(cgroup_memory("0::/svc\n", v2), Some((3 << 30, 500)));
        let unlimited = files(&[("/sys/fs/cgroup/svc/memory.max", "max\n")]);
        assert_eq!(cgroup_memory("0::/svc\n", unlimited), None);
        let v1 = files(&[
            (
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                "1073741824\n",
            ),
            ("/sys/fs/cgroup/memory/memory.usage_in_bytes", "900\n"),
            (
                "/sys/fs/cgroup/memory/memory.stat",
                "cache 100\nrss 5\ntotal_cache 400\n",
            ),
        ]);
        let pc = "5:cpu:/\n4:memory:/a/b\n0::/\n";
        assert_eq!(cgroup_memory(pc, v1), Some((1 << 30, 500)));
        let v1_none = files(&[(
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "9223372036854771712\n",
        )]);
        assert_eq!(cgroup_memory(pc, v1_none), None);
    }

    #[test]
    fn reads_pressure_faults_and_smaps() {
        let psi = "some avg10=12.50 avg60=3.00 avg300=0.00 total=5\nfull avg10=1.00 avg60=0 avg300=0 total=1\n";
        assert_eq!(psi_some_avg10(psi), Some(12.5));
        assert_eq!(psi_some_avg10("full avg10=1\n"), None);
        let smaps = "7f00-7f10 r--s 00000000 fe:01 12 /a.gguf\nSize: 64 kB\nRss: 12 kB\n\
                     VmFlags: rd sh mr mw me ms hg\n\
                     7f10-7f20 r--s 00010000 fe:01 12 /a.gguf\nSize: 64 kB\nRss: 40 kB\n\
                     FilePmdMapped: 8 kB\nVmFlags: rd sh mr nh\n\
                     7f20-7f30 r--s 00000000 fe:01 13 /b.gguf\nRss: 4 kB\n";
        let v = |start, end, rss: u64, huge_mapped: u64, huge_advised| Vma {
            start,
            end,
            rss: rss << 10,
            huge_mapped: huge_mapped << 10,
            huge_advised,
        };
        assert_eq!(
            smaps_vmas(smaps, 0x7f00..0x7f20),
            [
                v(0x7f00, 0x7f10, 12, 0, true),
                v(0x7f10, 0x7f20, 40, 8, false)
            ]
        );
        assert_eq!(
            smaps_vmas(smaps, 0x7f20..0x7f21),
            [v(0x7f20, 0x7f30, 4, 0, false)]
        );
        assert_eq!(smaps_vmas(smaps, 0x7f40..0x7f50), []);
        #[cfg(target_os = "linux")]
        {
            assert!(major_faults().is_some());
            assert!(headroom().is_some_and(|h| h.file_pages_bytes() > 0));
        }
    }
}
