//! `lfmd serve`: the daemon. Flags over the configuration file, the model
//! loaded and checked, the scheduler started, then `lfmd::serve` runs the
//! edges until a signal.

use anyhow::{Context, Result, bail};
use std::path::PathBuf;

/// `lfmd serve`'s flags. Each overrides the config file's key of the same
/// name (README lists them with their defaults); unset ones leave it.
#[derive(clap::Args, Clone)]
pub(crate) struct ServeArgs {
    /// The config file (an error if missing). Default: /etc/lfmd/lfmd.toml
    /// with --system or as root, else $XDG_CONFIG_HOME/lfmd/lfmd.toml (a
    /// missing default file is fine).
    #[arg(long, value_name = "PATH")]
    pub(crate) config: Option<PathBuf>,
    /// Run as the system service: /etc/lfmd/lfmd.toml and /run/lfmd/lfmd.sock
    /// (implied when running as root).
    #[arg(long)]
    pub(crate) system: bool,
    /// The GGUF model (default: $LFMD_MODEL, else the first LFM2-8B-A1B GGUF in
    /// the model directories; see README).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// Compute threads (default: one per core).
    #[arg(short = 't', long)]
    pub(crate) threads: Option<usize>,
    /// Where to listen: unix:PATH or tcp:HOST:PORT (repeatable). Default:
    /// unix:$XDG_RUNTIME_DIR/lfmd/lfmd.sock, or unix:/run/lfmd/lfmd.sock as
    /// the system service; with socket activation, the sockets systemd passes.
    #[arg(long = "grpc", value_name = "unix:PATH|tcp:HOST:PORT")]
    pub(crate) grpc: Vec<lfmd::serve::Listen>,
    /// Also serve HTTP here: OpenAI-compatible routes (/v1/chat/completions,
    /// /v1/completions, /v1/models), /metrics and /health; unix:PATH or
    /// tcp:HOST:PORT (repeatable) [default: none].
    #[arg(long = "http", value_name = "unix:PATH|tcp:HOST:PORT")]
    pub(crate) http: Vec<lfmd::serve::Listen>,
    /// Allow tcp: listeners on non-loopback addresses (the API has no authentication).
    #[arg(long)]
    pub(crate) allow_remote: bool,
    /// Sequences generated at once (the running batch) [default: 8].
    #[arg(long)]
    pub(crate) max_concurrent: Option<usize>,
    /// Requests that may wait for a slot; more are refused (RESOURCE_EXHAUSTED) [default: 64].
    #[arg(long)]
    pub(crate) queue: Option<usize>,
    /// Requests (running and waiting) one user may have; 0: no limit [default: 32].
    #[arg(long)]
    pub(crate) max_per_user: Option<usize>,
    /// Context tokens per sequence (default: 8192, at most the model's).
    #[arg(long)]
    pub(crate) ctx: Option<usize>,
    /// Prompt tokens prefilled per engine step, so long prompts do not stall
    /// running generations [default: 256].
    #[arg(long)]
    pub(crate) prefill_chunk: Option<usize>,
    /// Chat sessions kept (the least recently used idle one makes room) [default: 16].
    #[arg(long)]
    pub(crate) max_sessions: Option<usize>,
    /// Seconds before an idle chat session is dropped [default: 600].
    #[arg(long)]
    pub(crate) session_idle: Option<u64>,
    /// Memory for prompt-prefix states, so a repeated system prompt or tool
    /// list is not prefilled again; none: off [default: 256MiB].
    #[arg(long, value_name = "SIZE|none")]
    pub(crate) prefix_cache: Option<lfmd::config::ByteSize>,
    /// Let users share prefix-cache entries (by default each user's are its
    /// own: a shared entry lets one user time another's prompts).
    #[arg(long)]
    pub(crate) prefix_cache_shared: bool,
    /// max_tokens of requests that set none [default: 256].
    #[arg(long)]
    pub(crate) max_tokens: Option<usize>,
    /// Seconds running requests get to finish at shutdown [default: 5].
    #[arg(long)]
    pub(crate) shutdown_grace: Option<f64>,
    /// error, warn, info or debug [default: info].
    #[arg(long)]
    pub(crate) log_level: Option<lfmd::log::Level>,
    /// Group given the Unix socket ("" for none) [default: lfm, if it exists].
    #[arg(long)]
    pub(crate) socket_group: Option<String>,
    /// Memory the model's pages may take: auto, unlimited, or a size such
    /// as 3GiB; cold experts are paged out to stay under it [default: auto].
    #[arg(long, value_name = "auto|unlimited|SIZE")]
    pub(crate) memory_budget: Option<lfmd::config::MemoryBudget>,
    /// mlock the most used experts up to this size [default: none].
    #[arg(long, value_name = "SIZE")]
    pub(crate) lock_experts: Option<lfmd::config::ByteSize>,
    /// MoE layers ahead whose experts are predicted and read ahead
    /// [default: 0].
    #[arg(long, value_name = "N")]
    pub(crate) expert_lookahead: Option<usize>,
    /// Expert-paging I/O threads: expert loads in flight at once
    /// [default: 4].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) expert_io_threads: Option<u16>,
    /// Also serve the D-Bus API (org.lfm.Daemon1) on this bus: session,
    /// system, a bus address (unix:path=/run/x/bus), or none [default: none].
    #[arg(long, value_name = "session|system|ADDRESS|none")]
    pub(crate) dbus: Option<String>,
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
        Ok(match self.dbus.as_deref() {
            Some(b) => {
                b.parse::<lfmd::config::DbusSetting>()
                    .map_err(|e| anyhow::anyhow!("--dbus {e}"))?
                    .0
            }
            None => s.dbus.0.clone(),
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
            expert_lookahead,
            prefix_cache
        );
        s.prefix_cache_shared |= self.prefix_cache_shared;
        if let Some(n) = self.expert_io_threads {
            s.expert_io_threads = n.into();
        }
        if self.model.is_some() {
            s.model = self.model.clone();
        }
        if !self.grpc.is_empty() {
            s.grpc = self.grpc.clone();
        }
        if !self.http.is_empty() {
            s.http = self.http.clone();
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

pub(crate) fn serve(a: ServeArgs) -> Result<()> {
    use lfmd::serve::default_listen;
    // Before any thread: taking them clears LISTEN_FDS and LISTEN_PID.
    let inherited = lfmd::systemd::take_inherited()?;
    let settings = a.settings()?;
    lfmd::log::init(settings.log_level);
    // Sockets named `http` (FileDescriptorName=http) serve HTTP, the
    // others gRPC.
    let (inherited_http, inherited): (Vec<_>, Vec<_>) =
        inherited.into_iter().partition(|(_, name)| name == "http");
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
    for (s, name) in inherited.iter().chain(&inherited_http) {
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
        let http_bound = lfmd::serve::bind_all(
            inherited_http.into_iter().map(|(s, _)| s).collect(),
            &settings.http,
            settings.allow_remote,
            &settings.socket_group,
        )
        .await?;
        // HTTP answers from now on: /health says "loading" (503) until the
        // model is ready.
        let http = (!http_bound.is_empty()).then(|| lfmd::http::HttpEdge::start(http_bound));
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
            prefix_cache_bytes: settings.prefix_cache.0.unwrap_or(0),
            prefix_cache_shared: settings.prefix_cache_shared,
        };
        let (handle, exit) =
            lfmd::scheduler::start(model, &model_path.display().to_string(), config)
                .context("starting the engine thread")?;
        if let Some(h) = &http {
            h.ready(handle.clone());
        }
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
                a.settings()
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
            http,
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
