//! systemd integration, all optional (nothing happens outside systemd):
//! `sd_notify` states (READY, STATUS, RELOADING, STOPPING), a watchdog fed
//! only while the engine loop's heartbeat is fresh, and sockets passed by
//! socket activation (`LISTEN_FDS`). Uses `sd-notify` and `listenfd`, so no
//! `unsafe` of ours.

use crate::scheduler::Handle;
use sd_notify::NotifyState;
use std::time::Duration;

/// Sends `states` to systemd if `NOTIFY_SOCKET` is set; failures are only
/// logged (a service manager that went away is not our problem).
pub fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        crate::debug!("sd_notify: {e}");
    }
}

/// `RELOADING=1` with the `MONOTONIC_USEC=` that `Type=notify-reload` wants.
pub fn notify_reloading() {
    let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading")];
    if let Ok(t) = NotifyState::monotonic_usec_now() {
        states.push(t);
    }
    notify(&states);
}

/// The watchdog period systemd asks for (`WATCHDOG_USEC`, for this process
/// when `WATCHDOG_PID` is set), if any.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// How often the engine must wake up when idle so its heartbeat stays
/// fresh for a watchdog of `period`.
pub fn engine_wakeup(period: Option<Duration>) -> Duration {
    let second = Duration::from_secs(1);
    period.map_or(second, |p| (p / 4).clamp(Duration::from_millis(10), second))
}

/// Sends `WATCHDOG=1` every half period while the engine's heartbeat is
/// younger than half a period. A hung engine (a step that never returns, a
/// deadlock) stops the pings, and systemd restarts the daemon.
pub async fn feed_watchdog(handle: Handle, period: Duration) {
    feed_watchdog_with(handle, period, || notify(&[NotifyState::Watchdog])).await
}

/// [`feed_watchdog`] with the ping given (tests count them).
pub(crate) async fn feed_watchdog_with(handle: Handle, period: Duration, mut ping: impl FnMut()) {
    let half = period / 2;
    let mut tick = tokio::time::interval(half);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut withheld = false;
    loop {
        tick.tick().await;
        let age = handle.engine_heartbeat_age();
        if age <= half {
            if withheld {
                crate::warn!("the engine is responsive again; watchdog pings resume");
                withheld = false;
            }
            ping();
        } else if !withheld {
            crate::error!(
                "the engine loop has not gone round for {:.1} s; withholding watchdog pings (systemd restarts lfmd after {:.1} s)",
                age.as_secs_f64(),
                period.as_secs_f64()
            );
            withheld = true;
        }
    }
}

/// One `STATUS=` line: the model, the ISA and the load.
pub fn status_line(handle: &Handle) -> String {
    let m = handle.model_info();
    let (active, queued) = handle.load();
    let name = if m.name.is_empty() {
        std::path::Path::new(&m.path)
            .file_name()
            .map_or_else(|| m.path.clone(), |f| f.to_string_lossy().into_owned())
    } else {
        m.name.clone()
    };
    format!(
        "serving {name} ({} {}, {}, {} threads): {active} running, {queued} waiting",
        m.architecture, m.file_type, m.isa, m.threads
    )
}

/// Sends `STATUS=` when the load changes, at most once per `every`.
pub async fn report_status(handle: Handle, every: Duration, mut last: String) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let line = status_line(&handle);
        if line != last {
            notify(&[NotifyState::Status(&line)]);
            last = line;
        }
    }
}

/// A socket from systemd that lfmd cannot serve on.
#[derive(Debug, thiserror::Error)]
#[error(
    "socket {fd} ({name}) passed by systemd is not a listening Unix or TCP stream socket; lfmd.socket should have ListenStream= only"
)]
pub struct NotAListener {
    pub fd: usize,
    pub name: String,
}

/// A listening socket systemd passed us.
pub enum Inherited {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

/// Takes the sockets of socket activation (`LISTEN_FDS`, for this process
/// per `LISTEN_PID`), with their `FileDescriptorName=`s. Call before any
/// thread starts: it clears the variables so children do not inherit them.
pub fn take_inherited() -> Result<Vec<(Inherited, String)>, NotAListener> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Vec::new();
    for i in 0..fds.len() {
        let name = names.get(i).cloned().unwrap_or_else(|| "unknown".into());
        let sock = match fds.take_unix_listener(i) {
            Ok(Some(l)) => Inherited::Unix(l),
            _ => match fds.take_tcp_listener(i) {
                Ok(Some(l)) => Inherited::Tcp(l),
                _ => return Err(NotAListener { fd: i + 3, name }),
            },
        };
        out.push((sock, name));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_wakes_often_enough_for_the_watchdog() {
        assert_eq!(engine_wakeup(None), Duration::from_secs(1));
        assert_eq!(
            engine_wakeup(Some(Duration::from_millis(200))),
            Duration::from_millis(50)
        );
        assert_eq!(
            engine_wakeup(Some(Duration::from_secs(60))),
            Duration::from_secs(1)
        );
    }
}
