//! gRPC clients nobody here wrote, as users run them: grpcio (Python, from
//! PyPI) with default channel options against a real `lfmd serve`, on a
//! `--grpc unix:` socket and on one passed by socket activation
//! (`tests/python/grpc_interop.py` does the calls; the shipped
//! `examples/python/lfm_client.py` runs too). grpcio sends the socket path,
//! percent-encoded, as `:authority` (`daemon/src/authority.rs`).
//!
//! Without Python's grpcio, grpcio-tools, grpcio-health-checking and
//! grpcio-reflection (or `systemd-socket-activate` for the second trial) a
//! trial is reported ignored, not passed; `LFM_REQUIRE_PYTHON_GRPC=1` (CI)
//! makes that a failure.

mod common;

use common::{
    Lfmd, find_socket_activate, needy_trial, python, socket_activate_missing, socket_activated,
    synth_model,
};
use libtest_mimic::{Arguments, Failed};
use std::path::Path;
use std::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/grpc_interop.py");
const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/python/lfm_client.py"
);
const PROTO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");

/// Why the Python side cannot run here, if it cannot.
fn python_missing() -> Option<String> {
    let probe = Command::new(python())
        .args([
            "-c",
            "import grpc, grpc_tools, grpc_health.v1.health_pb2, grpc_reflection.v1alpha, jsonschema",
        ])
        .output();
    match probe {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "Python's grpcio packages are missing (pip install grpcio grpcio-tools \
             grpcio-health-checking grpcio-reflection jsonschema): {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
        Err(e) => Some(format!("{}: {e}", python())),
    }
}

/// Runs the interop script against `socket`; its output on failure.
fn interop(socket: &Path, mode: &str, d: &Lfmd) -> Result<(), Failed> {
    let out = Command::new(python())
        .arg(SCRIPT)
        .arg(socket)
        .arg(PROTO)
        .arg(EXAMPLE)
        .arg(mode)
        .output()
        .map_err(|e| format!("running {}: {e}", python()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && stdout.contains("all checks passed") {
        return Ok(());
    }
    Err(format!(
        "grpc_interop.py {mode} failed ({}):\n{stdout}\n{}\n--- lfmd log ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        d.log()
    )
    .into())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `lfmd serve --grpc unix:…`: every check, the example client included.
fn on_a_unix_socket() -> Result<(), Failed> {
    let d = runtime().block_on(Lfmd::start(&["--max-concurrent", "2"]));
    interop(&d.socket, "full", &d)
}

/// A socket passed by systemd (here `systemd-socket-activate`).
fn on_an_activated_socket() -> Result<(), Failed> {
    let activate = find_socket_activate().ok_or("systemd-socket-activate is missing")?;
    let tmp = tempfile::tempdir().unwrap();
    let model = synth_model(tmp.path());
    let socket = tmp.path().join("activated.sock");
    let cmd = socket_activated(&activate, &model, &socket);
    let d = Lfmd::spawn(cmd, tmp.path(), socket.clone());
    // The first connection (the script's) starts lfmd.
    let r = interop(&socket, "basic", &d);
    if r.is_ok() {
        let log = d.log();
        if !log.contains("socket activation: Unix socket \"grpc\"") {
            return Err(format!("lfmd was not socket-activated:\n{log}").into());
        }
    }
    r
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
        "grpcio::unix_socket",
        on_a_unix_socket,
        missing.clone(),
    );
    needy_trial(
        t,
        &args,
        "grpcio::socket_activated",
        on_an_activated_socket,
        missing.or(activate_missing),
    );
    libtest_mimic::run(&args, trials).exit();
}
