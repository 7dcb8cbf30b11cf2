//! `lfmd bench`: the flags, the engine they open, the report printed.

use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Prompt tokens for the prefill test (0 skips it).
    #[arg(short = 'p', long = "prompt", default_value_t = 512)]
    pub(crate) prompt: usize,
    /// Tokens for the decode test (0 skips it).
    #[arg(short = 'n', long = "gen", default_value_t = 128)]
    pub(crate) n_gen: usize,
    /// Repetitions of each test (the mean is reported).
    #[arg(short = 'r', long, default_value_t = 1)]
    pub(crate) reps: usize,
    /// Tokens already in the context when each test starts (filled
    /// untimed), as llama-bench's -d.
    #[arg(short = 'd', long, default_value_t = 0)]
    pub(crate) depth: usize,
    /// Sequences decoded together, a token each per step, as the daemon
    /// serves that many clients (the decode rate is all of theirs).
    #[arg(short = 's', long, default_value_t = 1)]
    pub(crate) sequences: usize,
    /// Compute threads (default: one per core).
    #[arg(short = 't', long)]
    pub(crate) threads: Option<usize>,
    /// Memory the model's pages may take (expert paging).
    #[arg(long, value_name = "auto|unlimited|SIZE", default_value = "auto")]
    pub(crate) memory_budget: lfmd::config::MemoryBudget,
    /// mlock the most used experts up to this size.
    #[arg(long, value_name = "SIZE", default_value = "none")]
    pub(crate) lock_experts: lfmd::config::ByteSize,
    /// MoE layers ahead whose experts are read ahead.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(crate) expert_lookahead: usize,
    /// How sure a prediction must be to read an expert ahead (router
    /// selection-score gap; 0: every predicted expert).
    #[arg(long, value_name = "GAP", default_value_t = lfmd::engine::paging::DEFAULT_PREDICT_MARGIN)]
    pub(crate) predict_margin: f32,
    /// Expert-paging I/O threads (loads in flight at once).
    #[arg(long, value_name = "N", default_value_t = lfmd::engine::paging::DEFAULT_IO_THREADS as u16,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) io_threads: u16,
    /// Also sample each decoded token under the JSON Schema in FILE, to
    /// measure what constrained decoding costs (mask per token, share of
    /// decode time).
    #[arg(long, value_name = "FILE")]
    pub(crate) json_schema: Option<std::path::PathBuf>,
    #[arg(long)]
    pub(crate) json: bool,
}

/// Opens the model as the flags say, runs the tests, prints the report.
pub(crate) fn bench(a: BenchArgs) -> Result<()> {
    let opts = lfmd::engine::EngineOptions {
        threads: a.threads,
        paging: lfmd::engine::PagingOptions {
            budget: a.memory_budget.0,
            lock_bytes: a.lock_experts.0.unwrap_or(0),
            lookahead: a.expert_lookahead,
            predict_margin: a.predict_margin,
            io_threads: a.io_threads.into(),
        },
        ..Default::default()
    };
    let m = lfmd::engine::Model::open_with(&a.model, opts)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let params = lfmd::bench::BenchParams {
        prompt: a.prompt,
        n_gen: a.n_gen,
        reps: a.reps,
        depth: a.depth,
        sequences: a.sequences,
        format: match &a.json_schema {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading --json-schema {}", p.display()))?;
                let tok = lfmd::tokenizer::Tokenizer::from_gguf(m.gguf())
                    .context("reading the model's vocabulary")?;
                let grammars = lfmd::constraint::Grammars::new(std::sync::Arc::new(tok))?;
                Some(lfmd::bench::BenchFormat {
                    grammars: std::sync::Arc::new(grammars),
                    format: lfmd::constraint::ResponseFormat::JsonSchema(text),
                })
            }
            None => None,
        },
    };
    let r = lfmd::bench::run(&m, &a.model.display().to_string(), params)?;
    crate::write_stdout(&if a.json {
        serde_json::to_string_pretty(&r)? + "\n"
    } else {
        r.to_text()
    })
}
