//! This process's memory as the kernel counts it (`/proc/self/status`):
//! resident anonymous memory (what lfmd allocated) and resident file pages
//! (the model mapping, which the kernel can drop and re-read at will).

use serde::Serialize;

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
    let kb = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let v = line[key.len()..].trim().trim_end_matches("kB").trim();
        v.parse::<u64>().ok().map(|k| k * 1024)
    };
    Some(Memory {
        rss_bytes: kb("VmRSS:")?,
        rss_anon_bytes: kb("RssAnon:").unwrap_or(0),
        rss_file_bytes: kb("RssFile:").unwrap_or(0),
        peak_rss_bytes: kb("VmHWM:").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
