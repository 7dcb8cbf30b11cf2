//! `lfmctl load`: a load generator. N concurrent clients send raw-prompt
//! requests for a while (or a fixed number each), some of which they cancel
//! mid-stream (dropping the stream) or abandon with their whole connection,
//! and report what happened to every request: completed (with its finish
//! reason), cancelled by the client, turned away by a full queue (the client
//! then waits as the daemon's retry hint says), or failed (with the status), plus
//! time to first token, throughput, and the daemon's RSS sampled over the
//! run. After the run it checks that the daemon holds no slot or queue
//! entry for any of them (nothing leaked, nothing lost).

use super::{Failure, Result, Sampling, client, options, out, rpc_failure};
use crate::Cli;
use clap::Args;
use lfm_proto::v1 as pb;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args)]
pub(crate) struct LoadArgs {
    #[command(flatten)]
    pub(crate) sampling: Sampling,
    /// Concurrent clients, each with its own connection.
    #[arg(long, default_value_t = 8)]
    pub(crate) clients: usize,
    /// Run for this many seconds (new requests start until then).
    #[arg(long, default_value_t = 30.0, conflicts_with = "requests")]
    pub(crate) duration: f64,
    /// Instead of a duration: this many requests per client.
    #[arg(long)]
    pub(crate) requests: Option<usize>,
    /// Words per prompt (each request's prompt is distinct).
    #[arg(long, default_value_t = 64)]
    pub(crate) prompt_words: usize,
    /// Share of requests the client cancels after a few tokens.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) cancel_rate: f64,
    /// Share of requests whose client drops its whole connection mid-stream.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) disconnect_rate: f64,
    /// Seed of the client-side choices (prompts, cancels).
    #[arg(long, default_value_t = 1)]
    pub(crate) load_seed: u64,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    pub(crate) json: bool,
}

/// What became of one request.
#[derive(Clone, Debug)]
enum Outcome {
    Completed(String),
    Cancelled,
    Disconnected,
    /// Turned away by back-pressure (queue full), with the daemon's hint.
    Rejected(Duration),
    Failed(String),
}

#[derive(Clone, Debug)]
struct Record {
    outcome: Outcome,
    ttft: Option<f64>,
    tokens: u64,
}

/// Client-side choices: a small xorshift, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const WORDS: &[&str] = &[
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "small", "robot",
    "reads", "weather", "report", "and", "counts", "clouds", "above", "hills",
];

fn prompt(rng: &mut Rng, client: usize, req: usize, words: usize) -> String {
    let mut p = format!("Request {client}-{req}:");
    for _ in 0..words {
        p.push(' ');
        p.push_str(WORDS[(rng.next() % WORDS.len() as u64) as usize]);
    }
    p
}

fn pct(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    xs[((p / 100.0) * (xs.len() - 1) as f64).round() as usize]
}

/// What a request is made to do.
#[derive(Clone, Copy)]
enum Plan {
    Full,
    /// Drop the stream after this many deltas.
    Cancel(usize),
    /// Drop the connection after this many deltas.
    Disconnect(usize),
}

async fn one_request(
    c: &mut pb::lfm_client::LfmClient<tonic::transport::Channel>,
    req: pb::GenerateRequest,
    plan: Plan,
) -> Record {
    let t0 = Instant::now();
    let mut stream = match c.generate(req).await {
        Ok(s) => s.into_inner(),
        Err(s) if s.code() == tonic::Code::ResourceExhausted => {
            let hint = s
                .metadata()
                .get("grpc-retry-pushback-ms")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .unwrap_or(100);
            return Record {
                outcome: Outcome::Rejected(Duration::from_millis(hint)),
                ttft: None,
                tokens: 0,
            };
        }
        Err(s) => {
            return Record {
                outcome: Outcome::Failed(format!("{:?}", s.code())),
                ttft: None,
                tokens: 0,
            };
        }
    };
    let (mut ttft, mut tokens, mut deltas) = (None, 0u64, 0usize);
    loop {
        match stream.message().await {
            Ok(Some(msg)) => match msg.event {
                Some(pb::generate_response::Event::Delta(d)) => {
                    ttft.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                    tokens += d.token_ids.len() as u64;
                    deltas += 1;
                    match plan {
                        Plan::Cancel(k) if deltas >= k => {
                            return Record {
                                outcome: Outcome::Cancelled,
                                ttft,
                                tokens,
                            };
                        }
                        Plan::Disconnect(k) if deltas >= k => {
                            return Record {
                                outcome: Outcome::Disconnected,
                                ttft,
                                tokens,
                            };
                        }
                        _ => {}
                    }
                }
                Some(pb::generate_response::Event::Done(d)) => {
                    let reason = pb::FinishReason::try_from(d.finish_reason)
                        .map(|r| {
                            r.as_str_name()
                                .trim_start_matches("FINISH_REASON_")
                                .to_lowercase()
                        })
                        .unwrap_or_else(|_| format!("unknown({})", d.finish_reason));
                    return Record {
                        outcome: Outcome::Completed(reason),
                        ttft,
                        tokens,
                    };
                }
                None => {}
            },
            Ok(None) => {
                return Record {
                    outcome: Outcome::Failed("stream ended without a finish reason".into()),
                    ttft,
                    tokens,
                };
            }
            Err(s) => {
                return Record {
                    outcome: Outcome::Failed(format!("{:?}", s.code())),
                    ttft,
                    tokens,
                };
            }
        }
    }
}

pub(crate) async fn run(cli: &Cli, a: &LoadArgs) -> Result<()> {
    if a.clients == 0 {
        return Err(Failure::Usage("--clients must be at least 1".into()));
    }
    for (name, r) in [
        ("--cancel-rate", a.cancel_rate),
        ("--disconnect-rate", a.disconnect_rate),
    ] {
        if !(0.0..=1.0).contains(&r) {
            return Err(Failure::Usage(format!(
                "{name} {r}: give a share between 0 and 1"
            )));
        }
    }
    if a.cancel_rate + a.disconnect_rate > 1.0 {
        return Err(Failure::Usage(
            "--cancel-rate plus --disconnect-rate exceed 1".into(),
        ));
    }
    if !(a.duration.is_finite() && a.duration > 0.0) {
        return Err(Failure::Usage(format!(
            "--duration {}: give a positive number of seconds",
            a.duration
        )));
    }
    let (opts, priority) = options(&a.sampling)?;
    // One connection to sample the daemon's status; fails early (exit 3) if
    // there is no daemon.
    let (mut status_client, target) = client(cli).await?;
    let records: Arc<Mutex<Vec<Record>>> = Arc::default();
    // Per client: tokens received and seconds from its first request to
    // the end of its last (its own rate, for fairness).
    let clients: Arc<Mutex<Vec<(u64, f64)>>> = Arc::default();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.duration);
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let (mut conn, _) = client(cli).await?;
        let records = records.clone();
        let clients = clients.clone();
        let opts = opts.clone();
        let mut rng = Rng(a
            .load_seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(c as u64 + 1)
            | 1);
        let (requests, words) = (a.requests, a.prompt_words);
        let (cancel, disconnect) = (a.cancel_rate, a.disconnect_rate);
        let reconnect = target.clone();
        tasks.push(tokio::spawn(async move {
            let (began, mut got) = (Instant::now(), 0u64);
            let mut i = 0;
            while requests.map_or(Instant::now() < deadline, |r| i < r) {
                let roll = rng.unit();
                let after = 1 + (rng.next() % 8) as usize;
                let plan = if roll < cancel {
                    Plan::Cancel(after)
                } else if roll < cancel + disconnect {
                    Plan::Disconnect(after)
                } else {
                    Plan::Full
                };
                let req = pb::GenerateRequest {
                    prompt: prompt(&mut rng, c, i, words),
                    options: Some(opts.clone()),
                    priority: priority.into(),
                    add_bos: None,
                };
                let rec = one_request(&mut conn, req, plan).await;
                got += rec.tokens;
                if let Outcome::Rejected(hint) = rec.outcome {
                    // Back-pressure: wait as the daemon asks (within reason).
                    tokio::time::sleep(
                        hint.clamp(Duration::from_millis(10), Duration::from_secs(2)),
                    )
                    .await;
                }
                if matches!(plan, Plan::Disconnect(_)) {
                    // Drop the connection with the stream and open a new one.
                    conn = match lfm_proto::client::connect(&reconnect).await {
                        Ok(c) => c,
                        Err(_) => {
                            records.lock().unwrap_or_else(|p| p.into_inner()).push(rec);
                            break;
                        }
                    };
                }
                records.lock().unwrap_or_else(|p| p.into_inner()).push(rec);
                i += 1;
            }
            clients
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((got, began.elapsed().as_secs_f64()));
        }));
    }
    // RSS over time, one sample a second while the clients run.
    let mut rss: Vec<(f64, u64)> = Vec::new();
    let all = futures_join(tasks);
    tokio::pin!(all);
    loop {
        tokio::select! {
            _ = &mut all => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if let Ok(s) = status_client.get_status(pb::GetStatusRequest::default()).await {
                    rss.push((start.elapsed().as_secs_f64(), s.into_inner().rss_bytes));
                }
            }
        }
    }
    let wall = start.elapsed().as_secs_f64();
    // Every request must have left the daemon: give cancellations one
    // engine step or so to land, then look.
    let mut leaked = (0, 0);
    for _ in 0..50 {
        let s = status_client
            .get_status(pb::GetStatusRequest::default())
            .await
            .map_err(rpc_failure)?
            .into_inner();
        rss.push((start.elapsed().as_secs_f64(), s.rss_bytes));
        leaked = (s.active_requests, s.queued_requests);
        if leaked == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let records = std::mem::take(&mut *records.lock().unwrap_or_else(|p| p.into_inner()));
    let clients = std::mem::take(&mut *clients.lock().unwrap_or_else(|p| p.into_inner()));
    let rates: Vec<f64> = clients
        .iter()
        .map(|&(tokens, secs)| tokens as f64 / secs.max(1e-9))
        .collect();
    report(a, &target.to_string(), wall, &records, &rates, &rss, leaked)
}

/// Awaits every task (a task that panicked counts as nothing recorded).
async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

fn report(
    a: &LoadArgs,
    target: &str,
    wall: f64,
    records: &[Record],
    client_rates: &[f64],
    rss: &[(f64, u64)],
    leaked: (u32, u32),
) -> Result<()> {
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let (mut completed, mut cancelled, mut disconnected, mut rejected) = (0u64, 0u64, 0u64, 0u64);
    for r in records {
        match &r.outcome {
            Outcome::Completed(why) => {
                completed += 1;
                *reasons.entry(why.clone()).or_default() += 1;
            }
            Outcome::Cancelled => cancelled += 1,
            Outcome::Disconnected => disconnected += 1,
            Outcome::Rejected(_) => rejected += 1,
            Outcome::Failed(why) => *failures.entry(why.clone()).or_default() += 1,
        }
    }
    let failed: u64 = failures.values().sum();
    let tokens: u64 = records.iter().map(|r| r.tokens).sum();
    let mut ttfts: Vec<f64> = records.iter().filter_map(|r| r.ttft).collect();
    let (p50, p99) = (pct(&mut ttfts, 50.0), pct(&mut ttfts, 99.0));
    // Fairness: the fastest client's rate over the slowest's.
    let slowest = client_rates.iter().copied().fold(f64::INFINITY, f64::min);
    let fastest = client_rates.iter().copied().fold(0.0, f64::max);
    let spread = if slowest > 0.0 && slowest.is_finite() {
        fastest / slowest
    } else {
        f64::NAN
    };
    let rss_max = rss.iter().map(|r| r.1).max().unwrap_or(0);
    let rss_first = rss.first().map_or(0, |r| r.1);
    let rss_last = rss.last().map_or(0, |r| r.1);
    if a.json {
        return out(&format!(
            "{:#}\n",
            serde_json::json!({
                "socket": target,
                "clients": a.clients,
                "wall_seconds": wall,
                "requests": records.len(),
                "completed": completed,
                "finish_reasons": reasons,
                "cancelled": cancelled,
                "disconnected": disconnected,
                "rejected_queue_full": rejected,
                "failed": failed,
                "failures": failures,
                "generated_tokens": tokens,
                "tokens_per_second": tokens as f64 / wall,
                "ttft_p50_seconds": p50,
                "ttft_p99_seconds": p99,
                "client_tokens_per_second": client_rates,
                "client_spread": if spread.is_finite() { serde_json::json!(spread) } else { serde_json::Value::Null },
                "rss_bytes": rss.iter().map(|r| serde_json::json!([r.0, r.1])).collect::<Vec<_>>(),
                "left_running": leaked.0,
                "left_queued": leaked.1,
            })
        ));
    }
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    out(&format!(
        "{} clients on {target}, {wall:.1} s: {} requests\n  completed {completed} {reasons:?}, cancelled {cancelled}, disconnected {disconnected}, turned away (queue full) {rejected}, failed {failed} {failures:?}\n  {tokens} tokens, {:.1} tok/s; time to first token p50 {p50:.3} s, p99 {p99:.3} s\n  per client {:.2} to {:.2} tok/s (spread {spread:.2})\n  daemon RSS {:.1} MiB at start, {:.1} max, {:.1} at end ({} samples)\n  left on the daemon afterwards: {} running, {} queued\n",
        a.clients,
        records.len(),
        tokens as f64 / wall,
        if slowest.is_finite() { slowest } else { 0.0 },
        fastest,
        mib(rss_first),
        mib(rss_max),
        mib(rss_last),
        rss.len(),
        leaked.0,
        leaked.1,
    ))?;
    if leaked != (0, 0) {
        return Err(Failure::Other(format!(
            "the daemon still holds {} running and {} queued requests after the run",
            leaked.0, leaked.1
        )));
    }
    Ok(())
}
