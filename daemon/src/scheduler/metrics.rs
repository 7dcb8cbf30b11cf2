//! What the scheduler counts as requests come and go, for `/metrics`: each
//! request's outcome by edge, refusals by edge and reason, and latency
//! histograms (queue wait, time to first token, time between tokens).
//! Figures that are snapshots (load, tokens, the pager's, the prefix
//! cache's, memory) come from [`Handle::status`](super::Handle::status) at
//! scrape time instead (`crate::http::metrics`).
//!
//! The metrics are prometheus-client's atomics: recording takes no lock the
//! engine waits on.

use super::{Edge, Failure, SubmitError};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use std::sync::Arc;
use std::time::Duration;

/// Two labels, as prometheus-client encodes them.
pub type Labels = [(&'static str, &'static str); 2];

/// The scheduler's event-driven figures.
#[derive(Debug)]
pub struct Metrics {
    /// Requests that ended, by `edge` and `finish_reason`.
    pub requests: Family<Labels, Counter>,
    /// Requests refused before they started, by `edge` and `reason`.
    pub rejected: Family<Labels, Counter>,
    /// Seconds from arrival to admission.
    pub queue_wait: Histogram,
    /// Seconds from arrival to the first generated token.
    pub time_to_first_token: Histogram,
    /// Seconds between a sequence's consecutive tokens.
    pub inter_token: Histogram,
}

/// Latency buckets (seconds): 1 ms to ~65 s, doubling.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            rejected: Family::default(),
            queue_wait: Histogram::new(latency_buckets()),
            time_to_first_token: Histogram::new(latency_buckets()),
            inter_token: Histogram::new(latency_buckets()),
        }
    }
}

impl Metrics {
    /// Counts a refusal of a request from `edge`.
    pub fn reject(&self, edge: Edge, e: &SubmitError) {
        let reason = match e {
            SubmitError::Invalid(_) => "invalid",
            SubmitError::TooLong(_) => "too_long",
            SubmitError::QueueFull { .. } => "queue_full",
            SubmitError::UserLimit { .. } => "user_limit",
            SubmitError::Session(_) => "session",
            SubmitError::ShuttingDown => "shutting_down",
            SubmitError::EngineDown(_) => "engine_down",
            SubmitError::Internal(_) => "internal",
        };
        self.rejected
            .get_or_create(&[("edge", edge.as_str()), ("reason", reason)])
            .inc();
    }
}

/// One accepted request's entry in the outcome counts: ended once, with
/// the reason given to [`Tally::end`] or [`Tally::fail`], or as `cancelled`
/// if dropped first (its client went away).
pub(crate) struct Tally {
    metrics: Arc<Metrics>,
    edge: Edge,
    ended: bool,
}

impl Tally {
    pub fn new(metrics: Arc<Metrics>, edge: Edge) -> Tally {
        Tally {
            metrics,
            edge,
            ended: false,
        }
    }

    pub fn end(&mut self, finish_reason: &'static str) {
        self.count(finish_reason);
    }

    /// Ends the entry with a failure's label.
    pub fn fail(&mut self, why: &Failure) {
        self.count(match why {
            Failure::DeadlineExceeded => "deadline_exceeded",
            Failure::ShuttingDown => "shutdown",
            Failure::Internal(_) => "error",
        });
    }

    /// The request was refused after all (counted by [`Metrics::reject`]).
    pub fn refused(&mut self) {
        self.ended = true;
    }

    pub fn queued(&self, wait: Duration) {
        self.metrics.queue_wait.observe(wait.as_secs_f64());
    }

    pub fn first_token(&self, after: Duration) {
        self.metrics
            .time_to_first_token
            .observe(after.as_secs_f64());
    }

    pub fn next_token(&self, after: Duration) {
        self.metrics.inter_token.observe(after.as_secs_f64());
    }

    fn count(&mut self, finish_reason: &'static str) {
        if !std::mem::replace(&mut self.ended, true) {
            self.metrics
                .requests
                .get_or_create(&[
                    ("edge", self.edge.as_str()),
                    ("finish_reason", finish_reason),
                ])
                .inc();
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.count("cancelled");
    }
}
