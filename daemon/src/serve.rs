//! `lfmd serve`: binds the listeners (a Unix socket by default, loopback TCP
//! when asked), serves gRPC (`lfm.v1.Lfm`, `grpc.health.v1`, server
//! reflection) over the scheduler, and shuts down cleanly: stop accepting,
//! let running requests finish within a grace period, stop the engine,
//! remove the socket.

use crate::grpc::LfmService;
use crate::scheduler::{EngineExit, Handle};
use lfm_proto::v1::lfm_server::LfmServer;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
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

pub enum Bound {
    Unix(UnixListener, SocketGuard),
    Tcp(TcpListener),
}

impl Bound {
    /// What clients connect to (`unix:PATH`, `tcp:ADDR` with the real port).
    pub fn describe(&self) -> String {
        match self {
            Bound::Unix(_, g) => format!("unix:{}", g.path.display()),
            Bound::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp:?".into(),
            },
        }
    }
}

/// Binds a Unix socket at `path` with mode 0660. A socket file left by a
/// daemon that died is removed; a live daemon on it is an error. A lock file
/// beside it (`PATH.lock`, held while serving) makes this race-free.
pub fn bind_unix(path: &Path) -> Result<Bound, ServeError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(io_err("creating the socket directory", dir.display()))?;
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io_err("setting the mode of", path.display()))?;
    Ok(Bound::Unix(
        listener,
        SocketGuard {
            path: path.into(),
            _lock: lock,
        },
    ))
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

/// Binds every listener (the default one when none is given).
pub async fn bind_all(listen: &[Listen], allow_remote: bool) -> Result<Vec<Bound>, ServeError> {
    let mut bound = Vec::new();
    for l in listen {
        bound.push(match l {
            Listen::Unix(p) => bind_unix(p)?,
            Listen::Tcp(a) => bind_tcp(a, allow_remote).await?,
        });
    }
    Ok(bound)
}

/// Tells systemd (`Type=notify`) about our state, if it is listening.
pub fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::from_abstract_name(name),
        None => UnixAddr::from_pathname(Path::new(&path)),
    };
    if let (Ok(sock), Ok(addr)) = (UnixDatagram::unbound(), addr) {
        let _ = sock.send_to_addr(state.as_bytes(), &addr);
    }
}

/// Serves gRPC on `bound` until `shutdown` resolves (then drains: running
/// requests get `grace` to finish) or the engine dies (an error).
pub async fn serve(
    handle: Handle,
    exit: EngineExit,
    bound: Vec<Bound>,
    grace: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
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
        eprintln!("lfmd: listening on {name}");
        let task = match b {
            Bound::Unix(l, guard) => {
                guards.push(guard);
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(l);
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop))
            }
            Bound::Tcp(l) => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop))
            }
        };
        servers.push((name, task));
    }
    notify_systemd("READY=1");
    eprintln!("lfmd: ready");

    let mut exit = std::pin::pin!(exit.wait());
    let died = tokio::select! {
        () = shutdown => None,
        r = &mut exit => Some(r.err().unwrap_or_else(|| "it exited unasked".into())),
    };
    notify_systemd("STOPPING=1");
    health.set_not_serving::<LfmServer<LfmService>>().await;
    let _ = stop_tx.send(true);
    let result = match died {
        Some(why) => {
            eprintln!("lfmd: the engine stopped ({why}); exiting");
            Err(ServeError::EngineDied(why))
        }
        None => {
            eprintln!(
                "lfmd: shutting down: no new requests; running ones get {:.1} s to finish",
                grace.as_secs_f64()
            );
            handle.shutdown(grace);
            exit.await.map_err(ServeError::EngineDied)
        }
    };
    // Streams have ended with the engine; connections close promptly.
    for (name, task) in servers {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("lfmd: gRPC server on {name}: {e}"),
            Ok(Err(e)) => eprintln!("lfmd: gRPC server on {name} failed: {e}"),
            Err(_) => eprintln!("lfmd: gRPC server on {name} did not close in time"),
        }
    }
    drop(guards);
    if result.is_ok() {
        eprintln!("lfmd: stopped");
    }
    result
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
        let first = bind_unix(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // A second daemon on the same path is refused (the lock is held).
        assert!(matches!(bind_unix(&path), Err(ServeError::InUse(_))));
        drop(first);
        assert!(!path.exists(), "a clean exit removes the socket");

        // A daemon that died: its socket file stays and nothing listens.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        assert!(matches!(bind_unix(&stale), Ok(Bound::Unix(..))));

        // Something live without our lock (another program): refused.
        let live = dir.path().join("live.sock");
        let _other = std::os::unix::net::UnixListener::bind(&live).unwrap();
        assert!(matches!(bind_unix(&live), Err(ServeError::InUse(_))));

        // Not a socket: left alone.
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind_unix(&file), Err(ServeError::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
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
