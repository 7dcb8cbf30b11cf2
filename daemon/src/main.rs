//! The `lfmd` binary: the daemon and its offline tools.

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, Subcommand};
use lfmd::gguf::Gguf;
use lfmd::{inspect, synth};
use std::path::PathBuf;
use std::process::ExitCode;

mod cmd;
use cmd::bench::{BenchArgs, bench};
use cmd::generate::{GenerateArgs, generate};
use cmd::serve::{ServeArgs, serve};

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
    /// Token ids of TEXT as a JSON array (BOS added and special tokens parsed unless told not to).
    Tokenize {
        #[arg(long)]
        model: PathBuf,
        /// Do not add the BOS token.
        #[arg(long)]
        no_bos: bool,
        /// Treat special-token text like `<|im_start|>` as plain text.
        #[arg(long)]
        no_special: bool,
        text: String,
    },
    /// Generate text from a prompt, streamed to stdout.
    Generate(GenerateArgs),
    /// Teacher-forced logits: a JSON array with one array of n_vocab floats per position.
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
    },
    /// Prefill and decode speed, measured like llama-bench's pp and tg tests.
    Bench(BenchArgs),
    /// Serve the model to local clients over gRPC (a Unix socket by default),
    /// and D-Bus and HTTP when asked.
    Serve(Box<ServeArgs>),
    /// Write a synthetic model with random weights in the real LFM2 layout.
    Synth {
        /// 8b-a1b, 8b-a1b-skewed, 350m, tiny-moe or tiny-dense.
        #[arg(long)]
        preset: String,
        /// Weight type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k,
        /// or llama.cpp's mixes q4_k_m and q5_k_m.
        #[arg(long, default_value = "f32")]
        quant: String,
        /// Seed: the same seed gives the same file, byte for byte.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where to write the model.
        out: PathBuf,
    },
    /// Write man pages (lfmd.1 and one per subcommand) into DIR; used by
    /// packaging/build-deb.sh.
    #[command(hide = true)]
    Man {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            lfmd::error!("{e:#}");
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
        Command::Tokenize {
            model,
            no_bos,
            no_special,
            text,
        } => {
            let g = Gguf::open(&model).with_context(|| format!("loading {}", model.display()))?;
            let tok = lfmd::tokenizer::Tokenizer::from_gguf(&g)?;
            let add_bos = !no_bos && tok.special_ids().add_bos;
            let ids = tok.encode(&text, add_bos, !no_special);
            write_stdout(&(serde_json::to_string(&ids)? + "\n"))?;
        }
        Command::Generate(a) => generate(a)?,
        Command::Serve(a) => serve(*a)?,
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
        Command::Bench(a) => bench(a)?,
        Command::Man { out } => {
            std::fs::create_dir_all(&out)
                .and_then(|()| clap_mangen::generate_to(Cli::command(), &out))
                .with_context(|| format!("writing man pages to {}", out.display()))?;
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
            let ty = synth::SynthQuant::parse(&quant)
                .ok_or_else(|| synth::SynthError::UnsupportedQuant(quant.clone()))?;
            let t0 = std::time::Instant::now();
            let s = synth::write_model(p, ty, seed, &out)?;
            eprintln!(
                "wrote {} ({} {}, seed {seed}): {} tensors, {} params, {} in {:.1}s",
                out.display(),
                p.name,
                ty.name(),
                s.tensors,
                inspect::fmt_count(s.n_params),
                inspect::fmt_bytes(s.bytes),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
