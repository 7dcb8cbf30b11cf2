//! The `lfmd` binary: the daemon and its offline tools.

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, Subcommand};
use lfmd::gguf::Gguf;
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
        /// Tokens already in the context when each test starts (filled
        /// untimed), as llama-bench's -d.
        #[arg(short = 'd', long, default_value_t = 0)]
        depth: usize,
        /// Sequences decoded together, a token each per step, as the daemon
        /// serves that many clients (the decode rate is all of theirs).
        #[arg(short = 's', long, default_value_t = 1)]
        sequences: usize,
        /// Compute threads (default: one per core).
        #[arg(short = 't', long)]
        threads: Option<usize>,
        /// Memory the model's pages may take (expert paging).
        #[arg(long, value_name = "auto|unlimited|SIZE", default_value = "auto")]
        memory_budget: lfmd::config::MemoryBudget,
        /// mlock the most used experts up to this size.
        #[arg(long, value_name = "SIZE", default_value = "none")]
        lock_experts: lfmd::config::ByteSize,
        /// MoE layers ahead whose experts are read ahead.
        #[arg(long, value_name = "N", default_value_t = 0)]
        expert_lookahead: usize,
        #[arg(long)]
        json: bool,
    },
    /// Serve the model to local clients over gRPC (a Unix socket by default).
    Serve(ServeArgs),
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

#[derive(clap::Args)]
struct GenerateArgs {
    #[arg(long)]
    model: PathBuf,
    /// Wrap the prompt as a user turn of the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System prompt (implies --chat).
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 0.3)]
    temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.15)]
    min_p: f32,
    #[arg(long, default_value_t = 1.05)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Compute threads (default: one per core).
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Print ids, text and timings as JSON at the end instead of streaming.
    #[arg(long)]
    json: bool,
    prompt: String,
}

/// `lfmd serve`'s flags. Each overrides the config file's key of the same
/// name (README lists them with their defaults); unset ones leave it.
#[derive(clap::Args, Clone)]
struct ServeArgs {
    /// The config file (an error if missing). Default: /etc/lfmd/lfmd.toml
    /// with --system or as root, else $XDG_CONFIG_HOME/lfmd/lfmd.toml (a
    /// missing default file is fine).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Run as the system service: /etc/lfmd/lfmd.toml and /run/lfmd/lfmd.sock
    /// (implied when running as root).
    #[arg(long)]
    system: bool,
    /// The GGUF model (default: $LFMD_MODEL, else the first LFM2-8B-A1B GGUF in
    /// the model directories; see README).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute threads (default: one per core).
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Where to listen: unix:PATH or tcp:HOST:PORT (repeatable). Default:
    /// unix:$XDG_RUNTIME_DIR/lfmd/lfmd.sock, or unix:/run/lfmd/lfmd.sock as
    /// the system service; with socket activation, the sockets systemd passes.
    #[arg(long = "grpc", value_name = "unix:PATH|tcp:HOST:PORT")]
    grpc: Vec<lfmd::serve::Listen>,
    /// Allow tcp: listeners on non-loopback addresses (the API has no authentication).
    #[arg(long)]
    allow_remote: bool,
    /// Sequences generated at once (the running batch) [default: 8].
    #[arg(long)]
    max_concurrent: Option<usize>,
    /// Requests that may wait for a slot; more are refused (RESOURCE_EXHAUSTED) [default: 64].
    #[arg(long)]
    queue: Option<usize>,
    /// Requests (running and waiting) one user may have; 0: no limit [default: 32].
    #[arg(long)]
    max_per_user: Option<usize>,
    /// Context tokens per sequence (default: 8192, at most the model's).
    #[arg(long)]
    ctx: Option<usize>,
    /// Prompt tokens prefilled per engine step, so long prompts do not stall
    /// running generations [default: 256].
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Chat sessions kept (the least recently used idle one makes room) [default: 16].
    #[arg(long)]
    max_sessions: Option<usize>,
    /// Seconds before an idle chat session is dropped [default: 600].
    #[arg(long)]
    session_idle: Option<u64>,
    /// max_tokens of requests that set none [default: 256].
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Seconds running requests get to finish at shutdown [default: 5].
    #[arg(long)]
    shutdown_grace: Option<f64>,
    /// error, warn, info or debug [default: info].
    #[arg(long)]
    log_level: Option<lfmd::log::Level>,
    /// Group given the Unix socket ("" for none) [default: lfm, if it exists].
    #[arg(long)]
    socket_group: Option<String>,
    /// Memory the model's pages may take: auto, unlimited, or a size such
    /// as 3GiB; cold experts are paged out to stay under it [default: auto].
    #[arg(long, value_name = "auto|unlimited|SIZE")]
    memory_budget: Option<lfmd::config::MemoryBudget>,
    /// mlock the most used experts up to this size [default: none].
    #[arg(long, value_name = "SIZE")]
    lock_experts: Option<lfmd::config::ByteSize>,
    /// MoE layers ahead whose experts are predicted and read ahead
    /// [default: 2].
    #[arg(long, value_name = "N")]
    expert_lookahead: Option<usize>,
    /// Also serve the D-Bus API (org.lfm.Daemon1) on this bus: session,
    /// system, a bus address (unix:path=/run/x/bus), or none [default: none].
    #[arg(long, value_name = "session|system|ADDRESS|none")]
    dbus: Option<String>,
}

impl ServeArgs {
    /// Whether this is the system service.
    fn system(&self) -> bool {
        self.system || lfm_proto::socket::running_as_root()
    }

    /// The config file and whether it must exist.
    fn config_path(&self) -> Option<(PathBuf, bool)> {
        match &self.config {
            Some(p) => Some((p.clone(), true)),
            None => lfmd::config::default_path(self.system(), |k| std::env::var(k).ok())
                .map(|p| (p, false)),
        }
    }

    /// The D-Bus bus to serve on: the flag, else the config file's `dbus`.
    fn dbus_bus(&self, s: &lfmd::config::Settings) -> Result<Option<lfm_proto::dbus::Bus>> {
        use lfm_proto::dbus::Bus;
        Ok(match self.dbus.as_deref() {
            Some("none") => None,
            Some(b) => Some(
                b.parse::<Bus>()
                    .map_err(|e| anyhow::anyhow!("--dbus {e}, or none"))?,
            ),
            None => match s.dbus {
                lfmd::config::Bus::None => None,
                lfmd::config::Bus::Session => Some(Bus::Session),
                lfmd::config::Bus::System => Some(Bus::System),
            },
        })
    }

    /// The config file (if any) with these flags over it.
    fn settings(&self) -> Result<lfmd::config::Settings> {
        let mut s = match self.config_path() {
            Some((path, required)) => lfmd::config::Settings::load(&path, required)?,
            None => lfmd::config::Settings::default(),
        };
        macro_rules! over {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { s.$f = v.clone(); } )* };
        }
        over!(
            threads,
            max_concurrent,
            queue,
            max_per_user,
            ctx,
            prefill_chunk,
            max_sessions,
            session_idle,
            max_tokens,
            shutdown_grace,
            log_level,
            socket_group,
            memory_budget,
            lock_experts,
            expert_lookahead
        );
        if self.model.is_some() {
            s.model = self.model.clone();
        }
        if !self.grpc.is_empty() {
            s.grpc = self.grpc.clone();
        }
        s.allow_remote |= self.allow_remote;
        for (key, v) in [
            ("--max-concurrent", s.max_concurrent),
            ("--prefill-chunk", s.prefill_chunk),
            ("--max-sessions", s.max_sessions),
            ("--max-tokens", s.max_tokens),
        ] {
            if v == 0 {
                bail!("{key} must be at least 1");
            }
        }
        if !(s.shutdown_grace.is_finite() && s.shutdown_grace >= 0.0) {
            bail!("--shutdown-grace must be a number of seconds, 0 or more");
        }
        Ok(s)
    }
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

fn generate(a: GenerateArgs) -> Result<()> {
    use lfmd::engine::{BatchItem, EngineOptions, LogitsWanted, Model};
    use lfmd::sequence::Sequence;
    use std::io::Write;
    let params = lfmd::sampler::SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        seed: a.seed,
        ..Default::default()
    };
    params.validate()?;
    if a.prompt.is_empty() {
        bail!("the prompt is empty: give some text to continue");
    }
    let stop = lfmd::stop::StopText::new(a.stop.clone())?;
    let opts = EngineOptions {
        threads: a.threads,
        ..Default::default()
    };
    let model = Model::open_with(&a.model, opts)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let tok = std::sync::Arc::new(lfmd::tokenizer::Tokenizer::from_gguf(model.gguf())?);
    let prompt_text = if a.chat || a.system.is_some() {
        let template = match model
            .gguf()
            .get("tokenizer.chat_template")
            .and_then(lfmd::gguf::Value::as_str)
        {
            Some(src) => lfmd::chat::ChatTemplate::new(src)?,
            None => lfmd::chat::ChatTemplate::builtin(),
        };
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(lfmd::chat::ChatMessage::new("system", s.clone()));
        }
        msgs.push(lfmd::chat::ChatMessage::new("user", a.prompt.clone()));
        let bos = tok
            .bos()
            .and_then(|b| tok.piece(b, true))
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        template.render(&msgs, None, true, &bos)?
    } else {
        a.prompt.clone()
    };
    // A rendered chat template already starts with BOS.
    let add_bos = tok.special_ids().add_bos && !(a.chat || a.system.is_some());
    let prompt = tok.encode(&prompt_text, add_bos, true);
    if prompt.len() >= model.desc.n_ctx_train {
        bail!(
            "the prompt is {} tokens; the model's context holds {}",
            prompt.len(),
            model.desc.n_ctx_train
        );
    }
    let mut seq = Sequence::new(
        &model,
        tok.clone(),
        prompt.clone(),
        params,
        a.max_tokens,
        stop,
    );
    let t0 = std::time::Instant::now();
    let mut t_first = None;
    let mut text = String::new();
    let mut out = std::io::stdout().lock();
    const PREFILL_CHUNK: usize = 512;
    while !seq.is_finished() {
        let chunk = seq.next_input(PREFILL_CHUNK).to_vec();
        let want = seq.needs_logits(chunk.len());
        let logits = model.forward(&mut [BatchItem {
            state: &mut seq.state,
            tokens: &chunk,
            logits: if want {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            },
        }])?;
        if let Some(step) = seq.advance(chunk.len(), want.then(|| &logits[0][..])) {
            t_first.get_or_insert_with(|| t0.elapsed());
            if !a.json {
                let _ = out
                    .write_all(step.text.as_bytes())
                    .and_then(|()| out.flush());
            }
            text.push_str(&step.text);
        }
    }
    let total = t0.elapsed();
    let reason = seq.finish_reason().map_or("unknown", |r| r.as_str());
    if a.json {
        let ttft = t_first.unwrap_or(total).as_secs_f64();
        let n = seq.generated().len();
        let v = serde_json::json!({
            "prompt_ids": prompt,
            "ids": seq.generated(),
            "text": text,
            "finish_reason": reason,
            "prompt_tokens": prompt.len(),
            "generated_tokens": n,
            "time_to_first_token_s": ttft,
            "total_s": total.as_secs_f64(),
            "prefill_tokens_per_s": prompt.len() as f64 / ttft.max(1e-9),
            "decode_tokens_per_s": if n > 1 { (n - 1) as f64 / (total.as_secs_f64() - ttft).max(1e-9) } else { 0.0 },
            "memory": lfmd::procstat::memory(),
        });
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&v)?);
    } else {
        let _ = writeln!(out);
        eprintln!(
            "[{reason}; {} prompt + {} generated tokens in {:.2}s]",
            prompt.len(),
            seq.generated().len(),
            total.as_secs_f64()
        );
    }
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    use lfmd::serve::default_listen;
    // Before any thread: taking them clears LISTEN_FDS and LISTEN_PID.
    let inherited = lfmd::systemd::take_inherited()?;
    let settings = a.settings()?;
    lfmd::log::init(settings.log_level);
    let listen = if settings.grpc.is_empty() && inherited.is_empty() {
        vec![default_listen(|k| std::env::var(k).ok(), a.system())?]
    } else {
        settings.grpc.clone()
    };
    let dbus_bus = a.dbus_bus(&settings)?;
    let model_path = match settings.model.clone() {
        Some(p) => p,
        None => lfmd::paths::find_default_model(|k| std::env::var(k).ok()).context(
            "no model given and none found: pass --model FILE.gguf, set LFMD_MODEL, or put \
             LFM2-8B-A1B-Q4_0.gguf in ~/.local/share/lfmd/models (scripts/quickstart.sh \
             synthesizes a small test model)",
        )?,
    };
    if let Some((path, _)) = a.config_path().filter(|(p, _)| p.exists()) {
        lfmd::info!("configuration: {}", path.display());
    }
    for (s, name) in &inherited {
        lfmd::info!(
            "socket activation: {} socket {name:?}",
            match s {
                lfmd::systemd::Inherited::Unix(_) => "Unix",
                lfmd::systemd::Inherited::Tcp(_) => "TCP",
            }
        );
    }
    let watchdog = lfmd::systemd::watchdog_period();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("lfmd-io")
        .enable_all()
        .build()
        .context("starting the I/O runtime")?;
    rt.block_on(async move {
        let signals = lfmd::serve::Signals::install().context("installing signal handlers")?;
        // Sockets first: a second daemon fails before loading anything.
        let bound = lfmd::serve::bind_all(
            inherited.into_iter().map(|(s, _)| s).collect(),
            &listen,
            settings.allow_remote,
            &settings.socket_group,
        )
        .await?;
        let mapped_file = file_identity(&model_path);
        let model = lfmd::engine::Model::open_with(
            &model_path,
            lfmd::engine::EngineOptions {
                threads: (settings.threads > 0).then_some(settings.threads),
                paging: settings.paging(),
                ..Default::default()
            },
        )
        .with_context(|| format!("loading {}", model_path.display()))?;
        let n_ctx_train = model.desc.n_ctx_train;
        let ctx = match settings.ctx {
            0 => lfmd::scheduler::DEFAULT_CONTEXT.min(n_ctx_train),
            n => n,
        };
        if ctx < 2 || ctx > n_ctx_train {
            bail!("--ctx {ctx}: the model's context holds 2 to {n_ctx_train} tokens");
        }
        let config = lfmd::scheduler::Config {
            max_concurrent: settings.max_concurrent,
            queue_capacity: settings.queue,
            max_per_user: settings.max_per_user,
            prefill_chunk: settings.prefill_chunk,
            n_ctx: ctx,
            max_sessions: settings.max_sessions,
            session_idle: std::time::Duration::from_secs(settings.session_idle),
            default_max_tokens: settings.max_tokens,
            idle_wakeup: lfmd::systemd::engine_wakeup(watchdog),
        };
        let (handle, exit) =
            lfmd::scheduler::start(model, &model_path.display().to_string(), config)
                .context("starting the engine thread")?;
        let info = handle.model_info();
        lfmd::info!(
            "{} ({} {}), isa {}, {} threads, context {}, {} concurrent, queue {}, {} per user",
            model_path.display(),
            info.architecture,
            info.file_type,
            info.isa,
            info.threads,
            info.context,
            settings.max_concurrent,
            settings.queue,
            settings.max_per_user
        );
        let reload = {
            let a = a.clone();
            let model_path = model_path.clone();
            move || {
                // The mapping stays on the file lfmd opened; a file renamed
                // over its path is served from the next start.
                if mapped_file.is_some() && file_identity(&model_path) != mapped_file {
                    lfmd::warn!(
                        "{} was replaced on disk; lfmd keeps serving the model it mapped at start; restart it (systemctl restart lfmd) to serve the new file",
                        model_path.display()
                    );
                }
                a.settings().map_err(|e| format!("{e:#}"))
            }
        };
        let dbus = match &dbus_bus {
            Some(bus) => {
                let d = lfmd::dbus::serve(handle.clone(), bus).await?;
                lfmd::info!("D-Bus: {} on {bus}", lfm_proto::dbus::BUS_NAME);
                Some(d)
            }
            None => None,
        };
        let control = lfmd::serve::Control {
            signals,
            settings,
            reload,
            watchdog,
        };
        lfmd::serve::serve(handle, exit, bound, control).await?;
        drop(dbus);
        Ok(())
    })
}

/// The (device, inode) of the file at `path`: which file a path names now.
fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
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
        Command::Serve(a) => serve(a)?,
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
            depth,
            sequences,
            threads,
            memory_budget,
            lock_experts,
            expert_lookahead,
            json,
        } => {
            let opts = lfmd::engine::EngineOptions {
                threads,
                paging: lfmd::engine::PagingOptions {
                    budget: memory_budget.0,
                    lock_bytes: lock_experts.0.unwrap_or(0),
                    lookahead: expert_lookahead,
                },
                ..Default::default()
            };
            let m = lfmd::engine::Model::open_with(&model, opts)
                .with_context(|| format!("loading {}", model.display()))?;
            let params = lfmd::bench::BenchParams {
                prompt,
                n_gen,
                reps,
                depth,
                sequences,
            };
            let r = lfmd::bench::run(&m, &model.display().to_string(), params)?;
            let text = if json {
                serde_json::to_string_pretty(&r)? + "\n"
            } else {
                r.to_text()
            };
            write_stdout(&text)?;
        }
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
