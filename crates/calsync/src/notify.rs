//! Notes to systemd (`sd_notify`): READY, RELOADING, STATUS, WATCHDOG, STOPPING, sent in order
//! by one thread of their own. Outside systemd `NOTIFY_SOCKET` is unset and sending is a no-op.

use sd_notify::NotifyState;
use tokio::sync::oneshot;
use tracing::warn;

/// A message for systemd, sent in order by one thread: the send blocks when the notify
/// socket's queue is full, and the main loop must never wait on systemd.
#[derive(Debug, Clone)]
pub enum Note {
    /// READY=1 with a STATUS line.
    Ready(String),
    /// RELOADING=1.
    Reloading,
    /// A new STATUS line.
    Status(String),
    /// WATCHDOG=1.
    Watchdog,
    /// STOPPING=1.
    Stopping,
}

/// Starts the thread that sends notes to systemd; returns where to send them and a receiver
/// that fires once every queued note was sent (after the sender is dropped).
pub fn notifier() -> (std::sync::mpsc::Sender<Note>, oneshot::Receiver<()>) {
    let (tx, rx) = std::sync::mpsc::channel::<Note>();
    // Fires when every queued note was sent (the channel closed and drained).
    let (done_tx, done_rx) = oneshot::channel::<()>();
    // Outside systemd NOTIFY_SOCKET is unset and sending is a no-op.
    let spawned = std::thread::Builder::new()
        .name("sd-notify".into())
        .spawn(move || {
            for note in rx {
                let r = match &note {
                    Note::Ready(status) => {
                        sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)])
                    }
                    Note::Reloading => sd_notify::notify(&[NotifyState::Reloading]),
                    Note::Status(status) => sd_notify::notify(&[NotifyState::Status(status)]),
                    Note::Watchdog => sd_notify::notify(&[NotifyState::Watchdog]),
                    Note::Stopping => sd_notify::notify(&[NotifyState::Stopping]),
                };
                if let Err(e) = r {
                    warn!(error = %e, "cannot notify systemd");
                }
            }
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the systemd notifier thread");
    }
    (tx, done_rx)
}
