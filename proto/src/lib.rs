//! The `lfm.v1` wire API of lfmd: the messages, the tonic client and server
//! generated from `lfm/v1/lfm.proto` (by `build.rs`, with protox: no `protoc`
//! needed), and the encoded descriptor set that server reflection serves.
//!
//! Nothing else in the workspace runs codegen; only the daemon's gRPC edge
//! and `lfmctl` use these types. [`dbus`] names the D-Bus interface (the
//! daemon's `dbus` module and `lfmctl --dbus` agree through it).

pub mod v1 {
    tonic::include_proto!("lfm.v1");

    /// The encoded `FileDescriptorSet` of `lfm/v1/lfm.proto` (for reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/lfm_descriptor.bin"));
}

/// The D-Bus API's names and how a bus is chosen (no D-Bus library here).
pub mod dbus {
    /// The daemon's well-known name, its object and that object's interface.
    pub const BUS_NAME: &str = "org.lfm.Daemon1";
    pub const OBJECT_PATH: &str = "/org/lfm/Daemon1";
    pub const INTERFACE: &str = "org.lfm.Daemon1";
    /// `Ask` creates `REQUESTS_PATH/N` with this interface.
    pub const REQUEST_INTERFACE: &str = "org.lfm.Request1";
    pub const REQUESTS_PATH: &str = "/org/lfm/Daemon1/requests";
    /// Prefix of the daemon's error names (`….InvalidArgument`, …).
    pub const ERROR_PREFIX: &str = "org.lfm.Daemon1.Error";
    /// Environment variable choosing the bus for clients.
    pub const BUS_ENV: &str = "LFMD_DBUS";

    /// Which bus: the user's session bus, the system bus, or any address
    /// (`unix:path=/run/x/bus`, a private bus for tests).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Bus {
        Session,
        System,
        Address(String),
    }

    impl std::str::FromStr for Bus {
        type Err = String;
        fn from_str(s: &str) -> Result<Bus, String> {
            match s {
                "session" => Ok(Bus::Session),
                "system" => Ok(Bus::System),
                // A D-Bus address is `transport:key=value,…`.
                a if a.contains(':') && a.contains('=') => Ok(Bus::Address(a.to_owned())),
                _ => Err(format!(
                    "{s:?} is not a bus: use session, system or an address like unix:path=/run/user/1000/bus"
                )),
            }
        }
    }

    impl std::fmt::Display for Bus {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Bus::Session => f.write_str("the session bus"),
                Bus::System => f.write_str("the system bus"),
                Bus::Address(a) => write!(f, "the bus at {a}"),
            }
        }
    }

    impl Bus {
        /// How `lfmd serve --dbus` and `lfmctl --dbus=` spell it.
        pub fn flag(&self) -> &str {
            match self {
                Bus::Session => "session",
                Bus::System => "system",
                Bus::Address(a) => a,
            }
        }
    }
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
