//! The `lfm.v1` wire API of lfmd: the messages, the tonic client and server
//! generated from `lfm/v1/lfm.proto` (by `build.rs`, with protox: no `protoc`
//! needed), and the encoded descriptor set that server reflection serves.
//!
//! Nothing else in the workspace runs codegen; only the daemon's gRPC edge
//! and `lfmctl` use these types.

pub mod v1 {
    tonic::include_proto!("lfm.v1");

    /// The encoded `FileDescriptorSet` of `lfm/v1/lfm.proto` (for reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/lfm_descriptor.bin"));
}

/// Where the daemon listens and clients look when not told: the API's
/// meeting point, so `lfmd` and `lfmctl` agree.
pub mod socket {
    use std::path::PathBuf;

    /// The system service's socket (systemd `RuntimeDirectory=lfmd`).
    pub const SYSTEM_SOCKET: &str = "/run/lfmd/lfmd.sock";
    /// Environment variable naming the socket for clients.
    pub const SOCKET_ENV: &str = "LFMD_SOCKET";

    /// A user daemon's socket: `$XDG_RUNTIME_DIR/lfmd/lfmd.sock`.
    pub fn user_socket(env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
        env("XDG_RUNTIME_DIR")
            .filter(|d| !d.is_empty())
            .map(|d| PathBuf::from(d).join("lfmd/lfmd.sock"))
    }

    /// Whether this process runs as root (a system daemon). `/proc/self`
    /// belongs to the process's effective user.
    pub fn running_as_root() -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    }
}

/// Connecting a client: to a Unix socket (the default) or TCP.
pub mod client {
    use crate::v1::lfm_client::LfmClient;
    use hyper_util::rt::TokioIo;
    use std::path::PathBuf;
    use tonic::transport::{Channel, Endpoint};

    /// Where a daemon listens, as `lfmd serve --grpc` spells it.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Target {
        Unix(PathBuf),
        Tcp(String),
    }

    impl Target {
        /// `unix:PATH`, `tcp:HOST:PORT`, or a bare socket path.
        pub fn parse(s: &str) -> Target {
            match s.split_once(':') {
                Some(("unix", p)) => Target::Unix(p.into()),
                Some(("tcp", a)) => Target::Tcp(a.into()),
                _ => Target::Unix(s.into()),
            }
        }
    }

    impl std::fmt::Display for Target {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Target::Unix(p) => write!(f, "unix:{}", p.display()),
                Target::Tcp(a) => write!(f, "tcp:{a}"),
            }
        }
    }

    /// Opens a connection now (so an absent daemon is an error here).
    pub async fn connect(target: &Target) -> Result<LfmClient<Channel>, tonic::transport::Error> {
        Ok(LfmClient::new(channel(target).await?))
    }

    /// A connected channel, for any service the daemon serves (health,
    /// reflection, lfm.v1).
    pub async fn channel(target: &Target) -> Result<Channel, tonic::transport::Error> {
        Ok(match target {
            Target::Tcp(addr) => {
                Endpoint::from_shared(format!("http://{addr}"))?
                    .connect()
                    .await?
            }
            Target::Unix(path) => {
                let path = path.clone();
                // The URI is required but unused: the connector dials the socket.
                Endpoint::from_static("http://lfmd.local")
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            tokio::net::UnixStream::connect(path)
                                .await
                                .map(TokioIo::new)
                        }
                    }))
                    .await?
            }
        })
    }
}
