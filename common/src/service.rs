//! Telling a service manager how a long-running command stands, through systemd's
//! `sd_notify` protocol (`Type=notify` units): `READY=1` once the command does its job,
//! `STATUS=` lines that `systemctl status` shows, `STOPPING=1` when a signal asked it to stop,
//! and `WATCHDOG=1` pings when the unit sets `WatchdogSec=`.
//!
//! Without `NOTIFY_SOCKET` in the environment (not started by a service manager) every call
//! does nothing. A notification that cannot be sent is logged at debug level and otherwise
//! ignored: a service manager that misses `READY=1` times the start-up out, which is the
//! report it needs.
//!
//! A status line is one line of printable text: control characters (a newline would start
//! another assignment, such as `READY=1`, in the datagram) become spaces, and it is cut at
//! [`MAX_STATUS`] bytes, since it may quote what a peer sent.

use std::time::Duration;

use sd_notify::NotifyState;

/// The longest status line sent, in bytes.
pub const MAX_STATUS: usize = 200;

/// Startup is done: the command serves. `status` says what it does.
pub fn ready(status: &str) {
    let line = status_line(status);
    send(&[NotifyState::Ready, NotifyState::Status(&line)]);
    start_watchdog();
}

/// What the command does now, for `systemctl status`.
pub fn status(status: &str) {
    let line = status_line(status);
    send(&[NotifyState::Status(&line)]);
}

/// A signal asked the command to stop; it is flushing what it holds.
pub fn stopping(status: &str) {
    let line = status_line(status);
    send(&[NotifyState::Stopping, NotifyState::Status(&line)]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("cannot notify the service manager: {e}");
    }
}

/// With `WatchdogSec=` set on the unit (`WATCHDOG_USEC` for this process), pings the service
/// manager at half that interval from a task on the current tokio runtime. The ping proves
/// that the runtime still turns: a command whose loop is stuck (an fsync that never returns
/// blocks `follow`'s single thread) misses it, and the service manager restarts it.
fn start_watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let period = (interval / 2).max(Duration::from_millis(100));
    tracing::info!(
        watchdog_secs = interval.as_secs_f64(),
        "pinging the service manager's watchdog"
    );
    rt.spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    });
}

/// `s` as one line of printable text of at most [`MAX_STATUS`] bytes.
pub fn status_line(s: &str) -> String {
    let mut line = String::with_capacity(s.len().min(MAX_STATUS));
    for c in s.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if line.len() + c.len_utf8() > MAX_STATUS {
            break;
        }
        line.push(c);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_line_is_one_printable_line_of_bounded_length() {
        assert_eq!(
            status_line("streaming from 0/3000000 on timeline 1"),
            "streaming from 0/3000000 on timeline 1"
        );
        // A newline from a peer cannot add an assignment such as READY=1.
        assert_eq!(status_line("bad\nREADY=1\r\t"), "bad READY=1  ");
        let long = "é".repeat(MAX_STATUS);
        let cut = status_line(&long);
        assert!(
            cut.len() <= MAX_STATUS && cut.len() > MAX_STATUS - 2,
            "{}",
            cut.len()
        );
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
