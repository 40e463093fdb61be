//! One cancellation signal per process, fired by SIGTERM or Ctrl-C.

use tokio_util::sync::CancellationToken;

/// Cloneable shutdown signal. `listen_for_signals` fires it on SIGTERM/SIGINT;
/// tests fire it with [`Shutdown::trigger`].
#[derive(Clone, Default, Debug)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    /// A signal that fires on SIGTERM or SIGINT.
    pub fn listen_for_signals() -> Self {
        let shutdown = Self::default();
        let fire = shutdown.clone();
        tokio::spawn(async move {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            let term = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for SIGTERM");
                        std::future::pending::<()>().await
                    }
                }
            };
            #[cfg(not(unix))]
            let term = std::future::pending::<()>();
            tokio::select! {
                _ = ctrl_c => tracing::info!("SIGINT received, draining"),
                _ = term => tracing::info!("SIGTERM received, draining"),
            }
            fire.trigger();
        });
        shutdown
    }

    /// Fires the signal.
    pub fn trigger(&self) {
        self.0.cancel();
    }

    /// Resolves once the signal has fired.
    pub async fn wait(&self) {
        self.0.cancelled().await
    }

    /// True once the signal has fired.
    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }
}
