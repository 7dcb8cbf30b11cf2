//! HTTP clients nobody here wrote, as users run them: the official `openai`
//! Python package (PyPI) pointed at `lfmd serve --http` by base URL, over
//! loopback TCP and a Unix socket, and on a socket passed by socket
//! activation (`FileDescriptorName=http`); `/metrics` parsed by
//! `prometheus_client`'s OpenMetrics parser. `tests/python/openai_interop.py`
//! does the calls and checks.
//!
//! Without Python's `openai`, `prometheus_client` and `jsonschema` (or
//! `systemd-socket-activate` for the second trial) a trial is reported
//! ignored, not passed; `LFM_REQUIRE_PYTHON_GRPC=1` (CI: Python clients are
//! installed) makes that a failure.

mod common;

use common::{
    LFMD, Lfmd, find_socket_activate, needy_trial, python, socket_activate_missing, synth_model,
};
use libtest_mimic::{Arguments, Failed};
use std::process::Command;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/python/openai_interop.py"
);

/// Why the Python side cannot run here, if it cannot.
fn python_missing() -> Option<String> {
    let probe = Command::new(python())
        .args(["-c", "import openai, prometheus_client, jsonschema"])
        .output();
    match probe {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "Python's openai, prometheus_client or jsonschema is missing (pip install openai prometheus_client jsonschema): {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
        Err(e) => Some(format!("{}: {e}", python())),
    }
}

/// Runs the script with `args`; its output on failure.
fn script(args: &[String], d: &Lfmd) -> Result<(), Failed> {
    let out = Command::new(python())
        .arg(SCRIPT)
        .args(args)
        .output()
        .map_err(|e| format!("running {}: {e}", python()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && stdout.contains("all checks passed") {
        return Ok(());
    }
    Err(format!(
        "openai_interop.py {} failed ({}):\n{stdout}\n{}\n--- lfmd log ---\n{}",
        args[0],
        out.status,
        String::from_utf8_lossy(&out.stderr),
        d.log()
    )
    .into())
}

/// `lfmd serve --http unix:… --http tcp:127.0.0.1:0`: every check.
fn on_tcp_and_unix() -> Result<(), Failed> {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("http.sock");
    let unix = format!("unix:{}", sock.display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let d = rt.block_on(Lfmd::start_in(
        tmp,
        &[
            "--http",
            &unix,
            "--http",
            "tcp:127.0.0.1:0",
            "--max-concurrent",
            "8",
        ],
    ));
    let port = common::http_port(&d)?;
    script(
        &[
            "full".into(),
            format!("http://{port}"),
            sock.display().to_string(),
        ],
        &d,
    )
}

/// A socket named `http` passed by systemd (here `systemd-socket-activate`),
/// served as HTTP; the first connection starts lfmd.
fn on_an_activated_socket() -> Result<(), Failed> {
    let activate = find_socket_activate().ok_or("systemd-socket-activate is missing")?;
    let tmp = tempfile::tempdir().unwrap();
    let model = synth_model(tmp.path());
    let sock = tmp.path().join("http.sock");
    let grpc = tmp.path().join("grpc.sock");
    let mut cmd = Command::new(activate);
    cmd.arg("-l")
        .arg(&sock)
        .arg("--fdname=http")
        .arg(LFMD)
        .arg("serve")
        .arg("--model")
        .arg(&model)
        .arg("--grpc")
        .arg(format!("unix:{}", grpc.display()))
        .args(["--threads", "1", "--config", "/dev/null"]);
    let d = Lfmd::spawn(cmd, tmp.path(), grpc);
    // Give the activator a moment to listen.
    let t0 = std::time::Instant::now();
    while !sock.exists() && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    script(&["basic".into(), sock.display().to_string()], &d)?;
    let log = d.log();
    if !log.contains("socket activation: Unix socket \"http\"") {
        return Err(format!("lfmd was not socket-activated:\n{log}").into());
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let missing = python_missing();
    let activate_missing = socket_activate_missing();
    let mut trials = Vec::new();
    let t = &mut trials;
    needy_trial(
        t,
        &args,
        "openai::tcp_and_unix",
        on_tcp_and_unix,
        missing.clone(),
    );
    needy_trial(
        t,
        &args,
        "openai::socket_activated",
        on_an_activated_socket,
        missing.or(activate_missing),
    );
    libtest_mimic::run(&args, trials).exit();
}
