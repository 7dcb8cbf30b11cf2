//! `lfmd serve` under (a stand-in for) systemd: the notify protocol through a
//! datagram socket the test binds (READY after the socket answers, STATUS,
//! watchdog pings, RELOADING/READY around SIGHUP, STOPPING and a clean exit
//! at SIGTERM), journald-style logs, socket activation through
//! `systemd-socket-activate`, the config file and flags, and the per-user
//! limit. Every wait has a deadline, so a hang fails.

use lfm_proto::v1 as pb;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tonic::Code;

mod common;
use common::{LFMD, Lfmd, synth_model};

/// The service manager's end of `NOTIFY_SOCKET`: every datagram, in order.
struct Notify {
    path: PathBuf,
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Notify {
    fn bind(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                if tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        Notify {
            path,
            rx,
            seen: Vec::new(),
        }
    }

    /// The next message with a line that `want` accepts; fails after 30 s.
    fn wait(&mut self, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(m) => {
                    self.seen.push(m.clone());
                    if m.lines().any(&want) {
                        return m;
                    }
                }
                Err(_) => panic!("no {what} from lfmd; got {:?}", self.seen),
            }
        }
    }

    /// Messages arriving within `d`.
    fn during(&mut self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        let mut got = Vec::new();
        while let Ok(m) = self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(m.clone());
            got.push(m);
        }
        got
    }
}

fn long_stream() -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: "Once upon a time".into(),
        options: Some(pb::SamplingOptions {
            temperature: Some(0.0),
            max_tokens: Some(4000),
            ignore_eos: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn notify_watchdog_reload_and_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = synth_model(dir);
    let socket = dir.join("run/lfmd.sock");
    let config = dir.join("lfmd.toml");
    std::fs::write(&config, "max_per_user = 8\nshutdown_grace = 0.3\n").unwrap();
    let mut notify = Notify::bind(dir);
    // journald's marker naming the log file as our stderr.
    let m = std::fs::File::create(dir.join("lfmd.log"))
        .unwrap()
        .metadata()
        .unwrap();
    // WATCHDOG_PID must be lfmd's own pid: the shell execs it, keeping its $$.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$@\"")
        .arg("sh")
        .arg(LFMD)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--model")
        .arg(&model)
        .arg("--grpc")
        .arg(format!("unix:{}", socket.display()))
        .args(["--threads", "1"])
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "200000")
        .env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()));
    let mut d = Lfmd::spawn(cmd, dir, socket.clone());

    // READY=1 (with a STATUS=) once the socket accepts connections.
    let ready = notify.wait("READY=1", |l| l == "READY=1");
    std::os::unix::net::UnixStream::connect(&socket).expect("the socket answers at READY=1");
    assert!(
        ready.lines().any(|l| l.starts_with("STATUS=serving")),
        "{ready:?}"
    );
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);

    // Watchdog pings at half of WATCHDOG_USEC while the engine is healthy.
    let pings = notify
        .during(Duration::from_millis(800))
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count();
    assert!((3..=12).contains(&pings), "{pings} pings in 0.8 s");

    // A running request shows in STATUS=.
    let mut c = d.client().await;
    let mut first = c.generate(long_stream()).await.unwrap().into_inner();
    assert!(first.message().await.unwrap().is_some());
    notify.wait("STATUS with one running", |l| {
        l.starts_with("STATUS=") && l.contains("1 running")
    });
    // Under the file's limit of 8, a second stream from the same user runs.
    let second = c.generate(long_stream()).await.unwrap().into_inner();
    drop(second);

    // SIGHUP: RELOADING=1 (with MONOTONIC_USEC) then READY=1; the new
    // per-user limit of 1 holds at once.
    std::fs::write(&config, "max_per_user = 1\nshutdown_grace = 0.3\n").unwrap();
    // Let the engine notice the dropped stream first.
    let t0 = Instant::now();
    while c
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .active_requests
        > 1
    {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d.signal("HUP");
    let reloading = notify.wait("RELOADING=1", |l| l == "RELOADING=1");
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading:?}"
    );
    notify.wait("READY=1 after the reload", |l| l == "READY=1");
    let e = c.generate(long_stream()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("at most 1") && e.message().contains("max_per_user"),
        "{}",
        e.message()
    );

    // SIGTERM mid-generation: STOPPING=1; the running stream gets its final
    // message once the grace period is over; exit code 0.
    d.signal("TERM");
    notify.wait("STOPPING=1", |l| l == "STOPPING=1");
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(30), first.message())
            .await
            .expect("the stream ends")
        {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    let e = end.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(d.wait(), Some(0), "{}", d.log());
    assert!(!socket.exists(), "the socket is removed");
    // journald format: priorities, no timestamps.
    let log = d.log();
    assert!(log.lines().any(|l| l == "<6>ready"), "{log}");
    assert!(log.lines().any(|l| l == "<6>stopped"), "{log}");
    assert!(log.lines().all(|l| l.starts_with('<')), "{log}");
}

#[tokio::test]
async fn the_watchdog_is_for_the_pid_systemd_names_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = synth_model(dir);
    let socket = dir.join("lfmd.sock");
    let mut notify = Notify::bind(dir);
    let mut cmd = Command::new(LFMD);
    cmd.arg("serve")
        .arg("--model")
        .arg(&model)
        .arg("--grpc")
        .arg(format!("unix:{}", socket.display()))
        .args(["--threads", "1", "--config", "/dev/null"])
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "200000")
        .env("WATCHDOG_PID", "1");
    let mut d = Lfmd::spawn(cmd, dir, socket);
    notify.wait("READY=1", |l| l == "READY=1");
    let got = notify.during(Duration::from_millis(400));
    assert!(
        !got.iter().any(|m| m.contains("WATCHDOG=1")),
        "pings for another pid: {got:?}"
    );
    d.signal("INT");
    assert_eq!(d.wait(), Some(0), "{}", d.log());
    // Not journald: timestamped lines.
    let log = d.log();
    assert!(log.lines().any(|l| l.ends_with("Z lfmd: stopped")), "{log}");
}

#[tokio::test]
async fn flags_override_the_file_and_the_per_user_limit_answers_resource_exhausted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = synth_model(dir);
    let socket = dir.join("lfmd.sock");
    let config = dir.join("lfmd.toml");
    // The file asks for 3 per user; the flag says 1.
    std::fs::write(
        &config,
        format!(
            "model = {:?}\nmax_per_user = 3\nthreads = 1\n",
            model.display().to_string()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(LFMD);
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--grpc")
        .arg(format!("unix:{}", socket.display()))
        .args(["--max-per-user", "1"])
        .env_remove("NOTIFY_SOCKET");
    let d = Lfmd::spawn(cmd, dir, socket);
    d.answering().await;
    let mut c = d.client().await;
    let mut running = c.generate(long_stream()).await.unwrap().into_inner();
    assert!(running.message().await.unwrap().is_some());
    let e = c.generate(long_stream()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    let msg = e.message();
    assert!(
        msg.contains(&format!("uid {uid} already has 1 requests"))
            && msg.contains("at most 1")
            && msg.contains("max_per_user")
            && msg.contains("--max-per-user"),
        "{msg}"
    );
    // Other calls are not limited, and the first stream is unharmed.
    c.get_status(pb::GetStatusRequest::default()).await.unwrap();
    assert!(running.message().await.unwrap().is_some());
    // Once it is gone, the user may start another.
    drop(running);
    let t0 = Instant::now();
    loop {
        match c.generate(long_stream()).await {
            Ok(_) => break,
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn config_errors_name_the_file_key_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("lfmd.toml");
    let run = |extra: &[&str]| {
        let out = Command::new(LFMD)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args([
                "--model",
                "/nonexistent.gguf",
                "--grpc",
                "unix:/nonexistent/x.sock",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&[]);
    assert!(
        err.contains("lfmd.toml") && err.contains("No such file"),
        "{err}"
    );
    std::fs::write(&config, "threads = 1\n# ok\nmax_concurent = 4\n").unwrap();
    let err = run(&[]);
    assert!(
        err.contains(&format!(
            "{}:3: max_concurent: unknown field",
            config.display()
        )),
        "{err}"
    );
    std::fs::write(&config, "queue = 8\nshutdown_grace = \"soon\"\n").unwrap();
    let err = run(&[]);
    assert!(err.contains("lfmd.toml:2: shutdown_grace: "), "{err}");
    // A bad flag value is named too.
    std::fs::write(&config, "").unwrap();
    let err = run(&["--max-concurrent", "0"]);
    assert!(err.contains("--max-concurrent must be at least 1"), "{err}");
}

/// `systemd-socket-activate` (from the `systemd` package) or a loud skip;
/// `LFM_REQUIRE_SYSTEMD_TOOLS=1` (CI) makes its absence a failure.
fn socket_activate() -> Option<PathBuf> {
    let found = common::find_socket_activate();
    if found.is_none() {
        assert!(
            std::env::var("LFM_REQUIRE_SYSTEMD_TOOLS").is_err(),
            "systemd-socket-activate is missing and LFM_REQUIRE_SYSTEMD_TOOLS is set"
        );
        eprintln!("SKIPPED: systemd-socket-activate not found (apt-get install systemd)");
    }
    found
}

#[tokio::test]
async fn socket_activation_serves_on_the_socket_systemd_passes() {
    let Some(activate) = socket_activate() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = synth_model(dir);
    let socket = dir.join("activated.sock");
    // The activator listens, and starts lfmd at the first connection.
    let cmd = common::socket_activated(&activate, &model, &socket);
    let mut d = Lfmd::spawn(cmd, dir, socket.clone());
    d.answering().await;
    let mut c = d.client().await;
    let a = c
        .generate(pb::GenerateRequest {
            prompt: "Hello".into(),
            options: Some(pb::SamplingOptions {
                temperature: Some(0.0),
                max_tokens: Some(3),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut a = a;
    let mut n = 0;
    while let Some(m) = a.message().await.unwrap() {
        if let Some(pb::generate_response::Event::Delta(_)) = m.event {
            n += 1;
        }
    }
    assert_eq!(n, 3);
    let log = d.log();
    assert!(
        log.contains("socket activation: Unix socket \"grpc\""),
        "{log}"
    );
    assert!(
        log.contains(&format!("listening on unix:{}", socket.display())),
        "{log}"
    );
    // No default socket was bound beside it.
    assert_eq!(log.matches("listening on").count(), 1, "{log}");
    d.signal("TERM");
    assert_eq!(d.wait(), Some(0), "{}", d.log());
    // The socket is systemd's: lfmd leaves it in place.
    assert!(socket.exists());
}
