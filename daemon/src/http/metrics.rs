//! `GET /metrics`: the daemon's figures in OpenMetrics text, encoded by
//! prometheus-client. The scheduler's counters and histograms
//! ([`scheduler::metrics`](crate::scheduler::metrics)) are registered as
//! they are; everything `lfmctl status` shows (load, tokens, memory, the
//! expert pager, the prefix cache) is read at scrape time by [`Snapshot`].
//!
//! Names follow Prometheus conventions: `lfmd_` prefix, base units
//! (seconds, bytes), `_total` on counters, and only low-cardinality labels
//! (edge, finish reason, refusal reason, memory kind): no prompt, session or
//! user ever becomes a label.

use crate::scheduler::Handle;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

/// The content type of the answer (OpenMetrics 1.0 text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The exposition of everything `handle` knows, ending with `# EOF`.
pub fn render(handle: &Handle) -> String {
    let mut registry = Registry::with_prefix("lfmd");
    let m = handle.metrics();
    registry.register(
        "requests",
        "Requests that ended, by the API they came through and how they ended",
        m.requests.clone(),
    );
    registry.register(
        "requests_rejected",
        "Requests refused before they started, by API and reason (queue_full is HTTP 429 / RESOURCE_EXHAUSTED)",
        m.rejected.clone(),
    );
    registry.register_with_unit(
        "queue_wait",
        "Time from a request's arrival to its admission into the running batch",
        Unit::Seconds,
        m.queue_wait.clone(),
    );
    registry.register_with_unit(
        "time_to_first_token",
        "Time from a request's arrival to its first generated token",
        Unit::Seconds,
        m.time_to_first_token.clone(),
    );
    registry.register_with_unit(
        "inter_token_latency",
        "Time between consecutive generated tokens of a request",
        Unit::Seconds,
        m.inter_token.clone(),
    );
    registry.register_collector(Box::new(Snapshot(handle.clone())));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// The figures read at scrape time.
struct Snapshot(Handle);

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Snapshot")
    }
}

/// Writes one unlabelled metric.
fn one(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    m: impl EncodeMetric,
) -> std::fmt::Result {
    let help = format!("{help}.");
    let enc = e.encode_descriptor(name, &help, unit.as_ref(), m.metric_type())?;
    m.encode(enc)
}

/// Writes one unlabelled counter.
fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    v: impl Into<f64>,
) -> std::fmt::Result {
    one(e, name, help, unit, ConstCounter::new(v.into()))
}

/// Writes one unlabelled gauge.
fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    v: impl Into<f64>,
) -> std::fmt::Result {
    one(e, name, help, unit, ConstGauge::new(v.into()))
}

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let h = &self.0;
        let s = h.status();
        let info = h.model_info();
        {
            let mut enc = e.encode_descriptor(
                "model",
                "The model served and how (always 1)",
                None,
                MetricType::Info,
            )?;
            let name = if info.name.is_empty() {
                crate::http::openai::model_id(info)
            } else {
                info.name.clone()
            };
            enc.encode_info(&[
                ("model", name.as_str()),
                ("architecture", info.architecture.as_str()),
                ("file_type", info.file_type.as_str()),
                ("isa", info.isa.as_str()),
                ("version", env!("CARGO_PKG_VERSION")),
            ])?;
        }
        let secs = Some(Unit::Seconds);
        let bytes = Some(Unit::Bytes);
        gauge(
            &mut e,
            "uptime",
            "Time since the daemon started serving",
            secs.clone(),
            s.uptime.as_secs_f64(),
        )?;
        gauge(
            &mut e,
            "requests_running",
            "Requests in the running batch",
            None,
            s.active as f64,
        )?;
        gauge(
            &mut e,
            "requests_queued",
            "Requests waiting for a slot in the batch",
            None,
            s.queued as f64,
        )?;
        gauge(
            &mut e,
            "max_concurrent",
            "Slots in the running batch",
            None,
            s.max_concurrent as f64,
        )?;
        gauge(
            &mut e,
            "queue_capacity",
            "Requests that may wait; more are refused",
            None,
            s.queue_capacity as f64,
        )?;
        gauge(
            &mut e,
            "sessions",
            "Chat sessions kept",
            None,
            s.sessions as f64,
        )?;
        gauge(
            &mut e,
            "threads",
            "Compute threads",
            None,
            info.threads as f64,
        )?;
        counter(
            &mut e,
            "requests_admitted",
            "Requests admitted into the running batch",
            None,
            s.requests_total as f64,
        )?;
        counter(
            &mut e,
            "prompt_tokens",
            "Prompt tokens of admitted requests (earlier session turns included)",
            None,
            s.prompt_tokens_total as f64,
        )?;
        counter(
            &mut e,
            "prefilled_tokens",
            "Prompt tokens fed through the model (the rest came from the prefix cache or a session's state)",
            None,
            s.prefilled_tokens_total as f64,
        )?;
        counter(
            &mut e,
            "generated_tokens",
            "Tokens generated",
            None,
            s.generated_tokens_total as f64,
        )?;
        if let Some(mem) = s.memory {
            {
                let mut enc = e.encode_descriptor(
                "resident_memory",
                "Resident memory of the daemon by kind: anon (heap: KV caches, prefix cache, buffers) and file (mapped model pages)",
                bytes.as_ref(),
                MetricType::Gauge,
            )?;
                for (kind, v) in [("anon", mem.rss_anon_bytes), ("file", mem.rss_file_bytes)] {
                    ConstGauge::new(v as f64).encode(enc.encode_family(&[("kind", kind)])?)?;
                }
            }
            gauge(
                &mut e,
                "resident_memory_peak",
                "Peak resident memory of the daemon",
                bytes.clone(),
                mem.peak_rss_bytes as f64,
            )?;
        }
        let p = &s.prefix_cache;
        gauge(
            &mut e,
            "prefix_cache_entries",
            "Prompt-prefix snapshots kept",
            None,
            p.entries as f64,
        )?;
        gauge(
            &mut e,
            "prefix_cache",
            "Memory held by prompt-prefix snapshots",
            bytes.clone(),
            p.bytes as f64,
        )?;
        gauge(
            &mut e,
            "prefix_cache_limit",
            "The prefix cache's limit in force",
            bytes.clone(),
            p.limit_bytes as f64,
        )?;
        counter(
            &mut e,
            "prefix_cache_hits",
            "Requests that resumed from a cached prefix",
            None,
            p.hits as f64,
        )?;
        counter(
            &mut e,
            "prefix_cache_misses",
            "Requests that found no cached prefix",
            None,
            p.misses as f64,
        )?;
        counter(
            &mut e,
            "prefix_cache_tokens_saved",
            "Prompt tokens not prefilled thanks to the prefix cache",
            None,
            p.tokens_saved as f64,
        )?;
        if let Some(x) = h.paging_stats(false) {
            if let Some(b) = x.budget_bytes {
                gauge(
                    &mut e,
                    "memory_budget",
                    "Memory the model's pages may take",
                    bytes.clone(),
                    b as f64,
                )?;
            }
            gauge(
                &mut e,
                "expert_cache_resident",
                "Expert weights believed resident",
                bytes.clone(),
                x.expert_resident_bytes as f64,
            )?;
            if let Some(cap) = x.expert_cap_bytes {
                gauge(
                    &mut e,
                    "expert_cache_cap",
                    "Expert weights allowed resident",
                    bytes.clone(),
                    cap as f64,
                )?;
            }
            gauge(
                &mut e,
                "expert_weights",
                "Expert weights in the model",
                bytes.clone(),
                x.expert_total_bytes as f64,
            )?;
            gauge(
                &mut e,
                "expert_cache_locked",
                "Expert weights locked in memory (mlock)",
                bytes.clone(),
                x.locked_bytes as f64,
            )?;
            counter(
                &mut e,
                "expert_loads",
                "Expert loads from storage",
                None,
                x.loads as f64,
            )?;
            counter(
                &mut e,
                "expert_read",
                "Bytes of experts loaded from storage",
                bytes.clone(),
                x.bytes_in as f64,
            )?;
            counter(
                &mut e,
                "expert_load",
                "Time the paging I/O threads spent loading experts",
                secs.clone(),
                x.load_seconds,
            )?;
            counter(
                &mut e,
                "expert_wait",
                "Time the engine waited for experts to load",
                secs.clone(),
                x.wait_seconds,
            )?;
            counter(
                &mut e,
                "expert_evictions",
                "Experts paged out to stay under the budget",
                None,
                x.evictions as f64,
            )?;
            if let Some(f) = x.major_faults {
                counter(
                    &mut e,
                    "major_faults",
                    "Major page faults of the daemon",
                    None,
                    f as f64,
                )?;
            }
            if let Some(pct) = x.memory_pressure {
                gauge(
                    &mut e,
                    "memory_pressure",
                    "Share of the last 10 s some task waited for memory (PSI some avg10)",
                    Some(Unit::Other("ratio".into())),
                    f64::from(pct) / 100.0,
                )?;
            }
        }
        Ok(())
    }
}
