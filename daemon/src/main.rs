//! The `lfmd` binary: the daemon and its offline tools.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use lfmd::gguf::{GgmlType, Gguf};
use lfmd::{inspect, synth};
use std::path::PathBuf;
use std::process::ExitCode;

/// On-device LLM daemon for LiquidAI LFM2 / LFM2-MoE GGUF models.
#[derive(Parser)]
#[command(name = "lfmd", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a GGUF model: architecture, parameters, layers, experts, tokenizer.
    Inspect {
        /// The GGUF file.
        file: PathBuf,
        /// Print JSON (fields documented in README.md) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Teacher-forced logits: a JSON array with one array of n_vocab floats per position.
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
    },
    /// Prefill and decode speed, measured like llama-bench's pp and tg tests.
    Bench {
        #[arg(long)]
        model: PathBuf,
        /// Prompt tokens for the prefill test (0 skips it).
        #[arg(short = 'p', long = "prompt", default_value_t = 512)]
        prompt: usize,
        /// Tokens for the decode test (0 skips it).
        #[arg(short = 'n', long = "gen", default_value_t = 128)]
        n_gen: usize,
        /// Repetitions of each test (the mean is reported).
        #[arg(short = 'r', long, default_value_t = 1)]
        reps: usize,
        /// Compute threads (default: one per core).
        #[arg(short = 't', long)]
        threads: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Write a synthetic model with random weights in the real LFM2 layout.
    Synth {
        /// 8b-a1b, 350m, tiny-moe or tiny-dense.
        #[arg(long)]
        preset: String,
        /// Weight type: f32, f16, bf16, q8_0 or q4_0.
        #[arg(long, default_value = "f32")]
        quant: String,
        /// Seed: the same seed gives the same file, byte for byte.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where to write the model.
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lfmd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes to stdout; a closed pipe (`lfmd inspect … | head`) is not an error.
fn write_stdout(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Command::Inspect { file, json } => {
            let g = Gguf::open(&file).with_context(|| format!("inspecting {}", file.display()))?;
            let report = inspect::inspect(&g, &file.display().to_string());
            let text = if json {
                serde_json::to_string_pretty(&report)? + "\n"
            } else {
                inspect::render_text(&report)
            };
            write_stdout(&text)?;
        }
        Command::Logits { model, tokens } => {
            let m = lfmd::engine::Model::open(&model)
                .with_context(|| format!("loading {}", model.display()))?;
            let mut state = lfmd::engine::SeqState::new(&m);
            let mut items = [lfmd::engine::BatchItem {
                state: &mut state,
                tokens: &tokens,
                logits: lfmd::engine::LogitsWanted::All,
            }];
            let logits = m.forward(&mut items)?.pop().expect("one item");
            let rows: Vec<&[f32]> = logits.chunks(m.n_vocab()).collect();
            write_stdout(&(serde_json::to_string(&rows)? + "\n"))?;
        }
        Command::Bench {
            model,
            prompt,
            n_gen,
            reps,
            threads,
            json,
        } => {
            let opts = lfmd::engine::EngineOptions {
                threads,
                ..Default::default()
            };
            let m = lfmd::engine::Model::open_with(&model, opts)
                .with_context(|| format!("loading {}", model.display()))?;
            let r = lfmd::bench::run(&m, &model.display().to_string(), prompt, n_gen, reps)?;
            let text = if json {
                serde_json::to_string_pretty(&r)? + "\n"
            } else {
                format!(
                    "{}: {} threads, isa {}\nprefill {:>5} tokens {:>9.2} tok/s\ndecode  {:>5} tokens {:>9.2} tok/s\n",
                    r.model,
                    r.threads,
                    r.isa,
                    r.prefill_tokens,
                    r.prefill_tokens_per_s,
                    r.decode_tokens,
                    r.decode_tokens_per_s
                )
            };
            write_stdout(&text)?;
        }
        Command::Synth {
            preset,
            quant,
            seed,
            out,
        } => {
            let Some(p) = synth::find_preset(&preset) else {
                bail!(synth::SynthError::UnknownPreset(preset));
            };
            let ty = GgmlType::from_name(&quant)
                .ok_or_else(|| synth::SynthError::UnsupportedQuant(quant.clone()))?;
            let t0 = std::time::Instant::now();
            let s = synth::write_model(p, ty, seed, &out)?;
            eprintln!(
                "wrote {} ({} {}, seed {seed}): {} tensors, {} params, {} in {:.1}s",
                out.display(),
                p.name,
                ty,
                s.tensors,
                inspect::fmt_count(s.n_params),
                inspect::fmt_bytes(s.bytes),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
