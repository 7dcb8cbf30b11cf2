//! What the integration tests that run the real `lfmd serve` share: a tiny
//! synthetic model, the daemon spawned with its log in a file and waited for
//! until it answers, signals, and a private D-Bus bus.
//!
//! Each test binary uses a part of it.
#![allow(dead_code)]

use lfm_proto::client::{Target, connect};
use lfm_proto::v1 as pb;
use lfm_proto::v1::lfm_client::LfmClient;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub const LFMD: &str = env!("CARGO_BIN_EXE_lfmd");

/// The file name every test model gets.
pub const MODEL_FILE: &str = "tiny-moe-q8_0.gguf";

/// Writes the tiny MoE model (q8_0, seed 1) as `dir/MODEL_FILE`.
pub fn synth_model(dir: &Path) -> PathBuf {
    let path = dir.join(MODEL_FILE);
    synth_model_at(&path, 1);
    path
}

/// Writes the tiny MoE model (q8_0) with `seed` to `path`.
pub fn synth_model_at(path: &Path, seed: u64) {
    let preset = lfmd::synth::find_preset("tiny-moe").unwrap();
    let ty = lfmd::synth::SynthQuant::parse("q8_0").unwrap();
    lfmd::synth::write_model(preset, ty, seed, path).unwrap();
}

/// `lfmd serve --model MODEL --grpc unix:SOCKET --threads 1`.
pub fn serve_command(model: &Path, socket: &Path) -> Command {
    let mut cmd = Command::new(LFMD);
    cmd.arg("serve")
        .arg("--model")
        .arg(model)
        .arg("--grpc")
        .arg(format!("unix:{}", socket.display()))
        .args(["--threads", "1"]);
    cmd
}

/// `systemd-socket-activate` (package `systemd`), if installed.
pub fn find_socket_activate() -> Option<PathBuf> {
    [
        "/usr/bin/systemd-socket-activate",
        "/bin/systemd-socket-activate",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Why a trial that needs `systemd-socket-activate` cannot run, if it
/// cannot (for [`needy_trial`]).
pub fn socket_activate_missing() -> Option<String> {
    find_socket_activate()
        .is_none()
        .then(|| "systemd-socket-activate is missing (apt-get install systemd)".to_owned())
}

/// `ACTIVATE -l SOCKET --fdname=grpc lfmd serve --model MODEL`: the
/// activator listens and starts lfmd at the first connection, passing the
/// socket as systemd would.
pub fn socket_activated(activate: &Path, model: &Path, socket: &Path) -> Command {
    let mut cmd = Command::new(activate);
    cmd.arg("-l")
        .arg(socket)
        .arg("--fdname=grpc")
        .arg(LFMD)
        .arg("serve")
        .arg("--model")
        .arg(model)
        .args(["--threads", "1", "--config", "/dev/null"]);
    cmd
}

/// A running `lfmd`, with stderr in `dir/lfmd.log`; killed when dropped.
pub struct Lfmd {
    pub child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub target: Target,
    /// The temporary directory, when this owns it.
    _tmp: Option<tempfile::TempDir>,
}

impl Drop for Lfmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Lfmd {
    /// Runs `cmd` with stderr to `dir/lfmd.log`; does not wait for it.
    pub fn spawn(mut cmd: Command, dir: &Path, socket: PathBuf) -> Lfmd {
        let log = std::fs::File::create(dir.join("lfmd.log")).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Lfmd {
            child,
            dir: dir.into(),
            target: Target::Unix(socket.clone()),
            socket,
            _tmp: None,
        }
    }

    /// `lfmd serve ARGS` on the tiny model in a new temporary directory,
    /// once it answers.
    pub async fn start(args: &[&str]) -> Lfmd {
        Lfmd::start_in(tempfile::tempdir().unwrap(), args).await
    }

    /// As [`Lfmd::start`], in `tmp` (which it keeps).
    pub async fn start_in(tmp: tempfile::TempDir, args: &[&str]) -> Lfmd {
        let model = synth_model(tmp.path());
        let socket = tmp.path().join("run/lfmd.sock");
        let mut cmd = serve_command(&model, &socket);
        cmd.args(args);
        let mut d = Lfmd::spawn(cmd, tmp.path(), socket);
        d._tmp = Some(tmp);
        d.answering().await;
        d
    }

    /// Waits until the daemon answers `GetStatus`; fails after 60 s.
    pub async fn answering(&self) {
        let t0 = Instant::now();
        loop {
            if let Ok(mut c) = connect(&self.target).await
                && c.get_status(pb::GetStatusRequest::default()).await.is_ok()
            {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "lfmd did not come up: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn client(&self) -> LfmClient<Channel> {
        connect(&self.target).await.unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("lfmd.log")).unwrap_or_default()
    }

    /// Sends `sig` (`TERM`, `HUP`, ...) to the daemon.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Waits for the daemon to exit (after a signal); its exit code.
    pub fn wait(&mut self) -> Option<i32> {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "lfmd did not exit: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A private session bus; killed when dropped.
pub struct PrivateBus {
    child: Child,
    pub address: String,
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Starts a bus in `dir`, or `None` (after a loud message) when
/// `dbus-daemon` or `busctl` is missing and `LFM_REQUIRE_DBUS` is not 1.
pub fn private_bus(dir: &Path) -> Option<PrivateBus> {
    if !(have("dbus-daemon") && have("busctl")) {
        let required = std::env::var("LFM_REQUIRE_DBUS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "LFM_REQUIRE_DBUS=1 but dbus-daemon or busctl is missing: apt-get install dbus-daemon systemd"
        );
        eprintln!(
            "\n*** SKIPPED: dbus-daemon or busctl is not installed, so the D-Bus tests did not run \
             (apt-get install dbus-daemon systemd; LFM_REQUIRE_DBUS=1 makes this a failure) ***\n"
        );
        return None;
    }
    let mut child = Command::new("dbus-daemon")
        .arg("--session")
        .arg("--nofork")
        .arg("--print-address=1")
        .arg(format!(
            "--address=unix:path={}",
            dir.join("bus.sock").display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting dbus-daemon");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line.trim().to_owned();
    assert!(address.starts_with("unix:"), "dbus-daemon said {line:?}");
    Some(PrivateBus { child, address })
}

/// A greedy chat turn of `max_tokens` over gRPC; the text.
pub async fn grpc_chat(target: &Target, prompt: &str, max_tokens: u32) -> String {
    let mut c = connect(target).await.unwrap();
    let mut s = c
        .chat(pb::ChatRequest {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: prompt.into(),
                ..Default::default()
            }],
            options: Some(pb::SamplingOptions {
                temperature: Some(0.0),
                max_tokens: Some(max_tokens),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    while let Some(m) = s.message().await.unwrap() {
        if let Some(pb::generate_response::Event::Delta(d)) = m.event {
            text.push_str(&d.text);
        }
    }
    text
}

/// The `HOST:PORT` of the daemon's TCP HTTP listener, from its log.
pub fn http_port(d: &Lfmd) -> Result<String, String> {
    let log = d.log();
    log.lines()
        .find_map(|l| l.split("HTTP: listening on tcp:").nth(1))
        .map(|p| p.trim().to_owned())
        .ok_or_else(|| format!("no TCP HTTP listener in the log:\n{log}"))
}

/// Adds a trial that needs something this machine may lack: `why` it
/// cannot run, if so. Then it is reported ignored (skipped), never passed,
/// unless `LFM_REQUIRE_PYTHON_GRPC=1` (CI) makes it a failure.
pub fn needy_trial(
    trials: &mut Vec<libtest_mimic::Trial>,
    args: &libtest_mimic::Arguments,
    name: &str,
    f: fn() -> Result<(), libtest_mimic::Failed>,
    why: Option<String>,
) {
    use libtest_mimic::Trial;
    let required = std::env::var("LFM_REQUIRE_PYTHON_GRPC").is_ok_and(|v| v == "1");
    match (why, required) {
        (Some(why), true) => {
            let msg = format!("LFM_REQUIRE_PYTHON_GRPC=1 but {why}");
            trials.push(Trial::test(name, move || Err(msg.into())));
        }
        (Some(why), false) => {
            if !args.list {
                eprintln!("{name}: SKIPPED ({why})");
            }
            trials.push(Trial::test(name, f).with_ignored_flag(true));
        }
        (None, _) => trials.push(Trial::test(name, f)),
    }
}

/// The Python that runs the client scripts (`$PYTHON`, else `python3`).
pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}
