//! `lfmd serve`: binds the listeners (a Unix socket by default, loopback TCP
//! when asked, or the sockets systemd passes), serves gRPC (`lfm.v1.Lfm`,
//! `grpc.health.v1`, server reflection) over the scheduler, tells systemd
//! how it is doing, reloads its settings on SIGHUP, and shuts down cleanly
//! on SIGTERM/SIGINT: stop accepting, let running requests finish within a
//! grace period, stop the engine, remove the socket.

use crate::config::Settings;
use crate::grpc::LfmService;
use crate::scheduler::{EngineExit, Handle};
use crate::systemd;
use lfm_proto::v1::lfm_server::LfmServer;
use sd_notify::NotifyState;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::transport::Server;

/// Where to listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(String),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl std::str::FromStr for Listen {
    type Err = ServeError;
    fn from_str(s: &str) -> Result<Self, ServeError> {
        match s.split_once(':') {
            Some(("unix", p)) if !p.is_empty() => Ok(Listen::Unix(PathBuf::from(p))),
            Some(("tcp", a)) if !a.is_empty() => Ok(Listen::Tcp(a.to_owned())),
            _ => Err(ServeError::BadListen(s.to_owned())),
        }
    }
}

/// The default listener: `/run/lfmd/lfmd.sock` for root (the system
/// service), `$XDG_RUNTIME_DIR/lfmd/lfmd.sock` for a user.
pub fn default_listen(
    env: impl Fn(&str) -> Option<String>,
    root: bool,
) -> Result<Listen, ServeError> {
    if root {
        return Ok(Listen::Unix(lfm_proto::socket::SYSTEM_SOCKET.into()));
    }
    lfm_proto::socket::user_socket(env)
        .map(Listen::Unix)
        .ok_or(ServeError::NoDefaultSocket)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("--grpc {0:?}: expected unix:PATH or tcp:HOST:PORT")]
    BadListen(String),
    #[error("XDG_RUNTIME_DIR is not set, so there is no default socket; pass --grpc unix:PATH")]
    NoDefaultSocket,
    #[error(
        "another lfmd is already serving on {0}; stop it first, or choose another socket with --grpc unix:PATH"
    )]
    InUse(PathBuf),
    #[error(
        "{0} exists and is not a socket; not touching it: remove it or choose another --grpc unix:PATH"
    )]
    NotASocket(PathBuf),
    #[error(
        "refusing to listen on {0}: not a loopback address, and the gRPC API has no authentication; use tcp:127.0.0.1:PORT, or pass --allow-remote if you mean it"
    )]
    NotLoopback(SocketAddr),
    #[error("{what} {target}: {source}")]
    Io {
        what: &'static str,
        target: String,
        source: io::Error,
    },
    #[error(
        "socket_group {0:?} is not a group here (looked in /etc/group); create it, or set socket_group = \"\" to keep the daemon's own group"
    )]
    NoSuchGroup(String),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the engine stopped: {0}")]
    EngineDied(String),
}

fn io_err(
    what: &'static str,
    target: impl std::fmt::Display,
) -> impl FnOnce(io::Error) -> ServeError {
    let target = target.to_string();
    move |source| ServeError::Io {
        what,
        target,
        source,
    }
}

/// A bound Unix socket; removes its file when dropped. Holds the lock that
/// says a live daemon owns the path.
pub struct SocketGuard {
    path: PathBuf,
    _lock: File,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A listener ready to serve. Sockets we bound carry a guard (they are
/// ours to remove); sockets systemd passed do not (they are its).
pub enum Bound {
    Unix(UnixListener, Option<SocketGuard>),
    Tcp(TcpListener),
}

impl Bound {
    /// What clients connect to (`unix:PATH`, `tcp:ADDR` with the real port).
    pub fn describe(&self) -> String {
        match self {
            Bound::Unix(_, Some(g)) => format!("unix:{}", g.path.display()),
            Bound::Unix(l, None) => match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            {
                Some(p) => format!("unix:{p}"),
                None => "unix:(unnamed)".into(),
            },
            Bound::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp:?".into(),
            },
        }
    }

    /// The path of a Unix listener.
    pub fn unix_path(&self) -> Option<PathBuf> {
        match self {
            Bound::Unix(_, Some(g)) => Some(g.path.clone()),
            Bound::Unix(l, None) => l.local_addr().ok()?.as_pathname().map(Path::to_path_buf),
            Bound::Tcp(_) => None,
        }
    }
}

/// The group given the Unix sockets when none is configured, if it exists.
pub const DEFAULT_SOCKET_GROUP: &str = "lfm";

/// The gid of `name` (a group name or number) from `/etc/group`. `""` is
/// none; so is the default group when it does not exist; any other
/// unknown group is an error.
pub fn resolve_group(name: &str) -> Result<Option<u32>, ServeError> {
    if name.is_empty() {
        return Ok(None);
    }
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(Some(gid));
    }
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    match find_group(&groups, name) {
        Some(gid) => Ok(Some(gid)),
        None if name == DEFAULT_SOCKET_GROUP => Ok(None),
        None => Err(ServeError::NoSuchGroup(name.into())),
    }
}

/// `name`'s gid in the text of an `/etc/group` file.
fn find_group(groups: &str, name: &str) -> Option<u32> {
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Gives `path` to group `gid`; only the default group may fail to apply
/// (a user daemon is usually not in it).
fn chown_group(path: &Path, gid: u32, group: &str) -> Result<(), ServeError> {
    match std::os::unix::fs::chown(path, None, Some(gid)) {
        Ok(()) => Ok(()),
        Err(e) if group == DEFAULT_SOCKET_GROUP => {
            crate::debug!("not giving {} to group {group}: {e}", path.display());
            Ok(())
        }
        Err(e) => Err(io_err(
            "giving to group",
            format!("{group}: {}", path.display()),
        )(e)),
    }
}

/// Binds a Unix socket at `path` with mode 0660, owned by `group` if given
/// (`(name, gid)`; a directory created for it too). A socket file left by
/// a daemon that died is removed; a live daemon on it is an error. A lock
/// file beside it (`PATH.lock`, held while serving) makes this race-free.
pub fn bind_unix(path: &Path, group: Option<(&str, u32)>) -> Result<Bound, ServeError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(io_err("creating the socket directory", dir.display()))?;
        if let Some((name, gid)) = group {
            chown_group(dir, gid, name)?;
        }
    }
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(
            "opening the lock file",
            Path::new(&lock_path).display(),
        ))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(ServeError::InUse(path.into())),
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(io_err("locking", Path::new(&lock_path).display())(e));
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // Not ours (we hold the lock): stale unless something answers.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::InUse(path.into()));
            }
            std::fs::remove_file(path)
                .map_err(io_err("removing the stale socket", path.display()))?;
        }
        Ok(_) => return Err(ServeError::NotASocket(path.into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("checking", path.display())(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_err("binding", path.display()))?;
    let guard = SocketGuard {
        path: path.into(),
        _lock: lock,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io_err("setting the mode of", path.display()))?;
    if let Some((name, gid)) = group {
        chown_group(path, gid, name)?;
    }
    Ok(Bound::Unix(listener, Some(guard)))
}

/// Binds a TCP listener; only loopback addresses unless `allow_remote`.
pub async fn bind_tcp(addr: &str, allow_remote: bool) -> Result<Bound, ServeError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(io_err("resolving", addr))?
        .collect();
    if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback())
        && !allow_remote
    {
        return Err(ServeError::NotLoopback(*a));
    }
    let l = TcpListener::bind(&addrs[..])
        .await
        .map_err(io_err("binding", addr))?;
    Ok(Bound::Tcp(l))
}

/// Binds every listener: the sockets systemd passed (`inherited`), then
/// those of `listen` (a Unix path systemd already passed is not bound
/// again). Unix sockets we bind get `socket_group` (see [`resolve_group`]).
pub async fn bind_all(
    inherited: Vec<systemd::Inherited>,
    listen: &[Listen],
    allow_remote: bool,
    socket_group: &str,
) -> Result<Vec<Bound>, ServeError> {
    let mut bound = Vec::new();
    for s in inherited {
        bound.push(match s {
            systemd::Inherited::Unix(l) => {
                let l = l
                    .set_nonblocking(true)
                    .and_then(|()| UnixListener::from_std(l))
                    .map_err(io_err("using", "the Unix socket systemd passed"))?;
                Bound::Unix(l, None)
            }
            systemd::Inherited::Tcp(l) => {
                let l = l
                    .set_nonblocking(true)
                    .and_then(|()| TcpListener::from_std(l))
                    .map_err(io_err("using", "the TCP socket systemd passed"))?;
                Bound::Tcp(l)
            }
        });
    }
    let passed: Vec<PathBuf> = bound.iter().filter_map(Bound::unix_path).collect();
    let gid = resolve_group(socket_group)?;
    for l in listen {
        bound.push(match l {
            Listen::Unix(p) if passed.iter().any(|q| q == p) => continue,
            Listen::Unix(p) => bind_unix(p, gid.map(|g| (socket_group, g)))?,
            Listen::Tcp(a) => bind_tcp(a, allow_remote).await?,
        });
    }
    Ok(bound)
}

/// The signals the daemon answers, installed early (before the model is
/// loaded) so none of them kills it by default action.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    /// Stops like SIGTERM when it fires (an in-process daemon in tests).
    stop: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Signals {
    pub fn install() -> io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            stop: None,
        })
    }

    /// Also stops when `stop` fires or is dropped.
    pub fn with_stop(mut self, stop: tokio::sync::oneshot::Receiver<()>) -> Signals {
        self.stop = Some(stop);
        self
    }
}

/// How `serve` runs beyond its listeners.
pub struct Control<R> {
    pub signals: Signals,
    /// The settings in force at start.
    pub settings: Settings,
    /// Reads the settings again (SIGHUP): the config file under the flags.
    pub reload: R,
    /// systemd's watchdog period, if it asked for one.
    pub watchdog: Option<Duration>,
    /// The HTTP edge, if any (started before the model was loaded).
    pub http: Option<crate::http::HttpEdge>,
}

/// Serves gRPC on `bound` until SIGTERM/SIGINT (then drains: running
/// requests get the shutdown grace to finish) or the engine dies (an
/// error). SIGHUP reloads the settings (`control.reload`).
pub async fn serve<R, E>(
    handle: Handle,
    exit: EngineExit,
    bound: Vec<Bound>,
    control: Control<R>,
) -> Result<(), ServeError>
where
    R: FnMut() -> Result<Settings, E>,
    E: std::fmt::Display,
{
    let Control {
        mut signals,
        settings: started,
        mut reload,
        watchdog,
        http,
    } = control;
    let mut grace = started.shutdown_grace();
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<LfmServer<LfmService>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lfm_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lfm_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let lfm = LfmServer::new(LfmService::new(handle.clone()))
        .max_decoding_message_size(crate::grpc::MAX_REQUEST_BYTES);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    let mut guards = Vec::new();
    for b in bound {
        let router = Server::builder()
            .add_service(health_svc.clone())
            .add_service(reflection_v1.clone())
            .add_service(reflection_v1alpha.clone())
            .add_service(lfm.clone());
        let mut rx = stop_rx.clone();
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let name = b.describe();
        crate::info!("listening on {name}");
        let task = match b {
            Bound::Unix(l, guard) => {
                guards.push(guard);
                // Clients send all sorts of `:authority` on Unix sockets
                // (grpcio: the path, percent-encoded), which h2 refuses.
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(l)
                    .map(|c| c.map(crate::authority::AuthorityFix::new));
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop))
            }
            Bound::Tcp(l) => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop))
            }
        };
        servers.push((name, task));
    }
    let status = systemd::status_line(&handle);
    systemd::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    crate::info!("ready");
    let mut background = vec![tokio::spawn(systemd::report_status(
        handle.clone(),
        Duration::from_secs(1),
        status,
    ))];
    if let Some(period) = watchdog {
        crate::info!(
            "systemd watchdog: {:.1} s; pinging while the engine is responsive",
            period.as_secs_f64()
        );
        background.push(tokio::spawn(systemd::feed_watchdog(handle.clone(), period)));
    }

    let mut exit = std::pin::pin!(exit.wait());
    let died = loop {
        let name = tokio::select! {
            _ = signals.term.recv() => "SIGTERM",
            _ = signals.int.recv() => "SIGINT",
            _ = async {
                match &mut signals.stop {
                    Some(rx) => {
                        let _ = rx.await;
                    }
                    None => std::future::pending().await,
                }
            } => "a stop request",
            _ = signals.hup.recv() => {
                systemd::notify_reloading();
                match reload() {
                    Ok(new) => {
                        apply_reload(&handle, &started, &new);
                        grace = new.shutdown_grace();
                    }
                    Err(e) => crate::error!("reload failed; the running settings stay: {e:#}"),
                }
                let status = systemd::status_line(&handle);
                systemd::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                continue;
            }
            r = &mut exit => break Some(r.err().map_or_else(|| "it exited unasked".to_owned(), |e| e.to_string())),
        };
        crate::info!("{name} received");
        break None;
    };
    let (active, _) = handle.load();
    let stopping = format!(
        "stopping: {active} running requests get {:.1} s to finish",
        grace.as_secs_f64()
    );
    systemd::notify(&[NotifyState::Stopping, NotifyState::Status(&stopping)]);
    if died.is_none() {
        // A second signal does not wait for the drain.
        let Signals {
            mut term, mut int, ..
        } = signals;
        background.push(tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            crate::warn!("second signal: exiting now");
            std::process::exit(1);
        }));
    }
    health.set_not_serving::<LfmServer<LfmService>>().await;
    if let Some(h) = &http {
        h.stopping();
    }
    let _ = stop_tx.send(true);
    let result = match died {
        Some(why) => {
            crate::error!("the engine stopped ({why}); exiting");
            Err(ServeError::EngineDied(why))
        }
        None => {
            crate::info!(
                "shutting down: no new requests; running ones get {:.1} s to finish",
                grace.as_secs_f64()
            );
            handle.shutdown(grace);
            exit.await
                .map_err(|e| ServeError::EngineDied(e.to_string()))
        }
    };
    // Streams have ended with the engine; connections close promptly.
    for (name, task) in servers {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => crate::warn!("gRPC server on {name}: {e}"),
            Ok(Err(e)) => crate::warn!("gRPC server on {name} failed: {e}"),
            Err(_) => crate::warn!("gRPC server on {name} did not close in time"),
        }
    }
    if let Some(h) = http {
        h.shutdown(Duration::from_secs(5)).await;
    }
    for task in background {
        task.abort();
    }
    drop(guards);
    if result.is_ok() {
        crate::info!("stopped");
    }
    result
}

/// Applies what a reload may change (limits, log level, shutdown grace)
/// and warns about changed settings that need a restart.
fn apply_reload(handle: &Handle, started: &Settings, new: &Settings) {
    crate::log::set_level(new.log_level);
    handle.set_limits(new.limits());
    for key in new.restart_only_changes(started) {
        crate::warn!("{key} changed in the configuration; it takes effect at the next restart");
    }
    let l = new.limits();
    crate::info!(
        "reloaded: {} concurrent, queue {}, {} per user, prefill chunk {}, max_tokens {}, log level {}, shutdown grace {:.1} s",
        l.max_concurrent,
        l.queue_capacity,
        l.max_per_user,
        l.prefill_chunk,
        l.default_max_tokens,
        new.log_level.as_str(),
        new.shutdown_grace
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs_parse() {
        assert_eq!(
            "unix:/tmp/x.sock".parse::<Listen>().unwrap(),
            Listen::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:50051".parse::<Listen>().unwrap(),
            Listen::Tcp("127.0.0.1:50051".into())
        );
        for bad in ["", "unix:", "/tmp/x.sock", "http://x", "tcp:"] {
            assert!(bad.parse::<Listen>().is_err(), "{bad}");
        }
        let env = |k: &str| (k == "XDG_RUNTIME_DIR").then(|| "/run/user/1000".to_owned());
        assert_eq!(
            default_listen(env, false).unwrap(),
            Listen::Unix("/run/user/1000/lfmd/lfmd.sock".into())
        );
        assert_eq!(
            default_listen(|_| None, true).unwrap(),
            Listen::Unix("/run/lfmd/lfmd.sock".into())
        );
        assert!(default_listen(|_| None, false).is_err());
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/lfmd.sock");
        let first = bind_unix(&path, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // A second daemon on the same path is refused (the lock is held).
        assert!(matches!(bind_unix(&path, None), Err(ServeError::InUse(_))));
        drop(first);
        assert!(!path.exists(), "a clean exit removes the socket");

        // A daemon that died: its socket file stays and nothing listens.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        assert!(matches!(bind_unix(&stale, None), Ok(Bound::Unix(..))));

        // Something live without our lock (another program): refused.
        let live = dir.path().join("live.sock");
        let _other = std::os::unix::net::UnixListener::bind(&live).unwrap();
        assert!(matches!(bind_unix(&live, None), Err(ServeError::InUse(_))));

        // Not a socket: left alone.
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            bind_unix(&file, None),
            Err(ServeError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    #[test]
    fn groups_resolve_from_etc_group() {
        let groups = "root:x:0:\nlfm:x:990:alice,bob\nbad:x\n";
        assert_eq!(find_group(groups, "lfm"), Some(990));
        assert_eq!(find_group(groups, "root"), Some(0));
        assert_eq!(find_group(groups, "bad"), None);
        assert_eq!(find_group(groups, "nope"), None);
        assert_eq!(resolve_group("").unwrap(), None);
        assert_eq!(resolve_group("1234").unwrap(), Some(1234));
        assert!(matches!(
            resolve_group("no-such-group-here"),
            Err(ServeError::NoSuchGroup(_))
        ));
    }

    #[tokio::test]
    async fn tcp_is_loopback_only_unless_allowed() {
        assert!(matches!(
            bind_tcp("0.0.0.0:0", false).await,
            Err(ServeError::NotLoopback(_))
        ));
        assert!(matches!(
            bind_tcp("127.0.0.1:0", false).await,
            Ok(Bound::Tcp(_))
        ));
    }
}
