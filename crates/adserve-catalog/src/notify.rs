//! Following a PostgreSQL NOTIFY channel for as long as the follower wants:
//! the catalog index and the ranker's model registry follower share it.

use std::time::Duration;

use sqlx::{PgPool, postgres::PgListener};

/// What the LISTEN connection tells the follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice<'a> {
    /// A notification with this payload.
    Payload(&'a str),
    /// The connection was (re)established: notifications sent meanwhile are
    /// lost, so look again (as a poll would).
    Resync,
}

/// LISTENs on `channel` over `pool`, handing each notice to `on`, and
/// reconnects forever (backing off from 200 ms to 10 s) until `on` returns
/// false or `alive` does. An idle connection is probed every 30 s, so one
/// that died without a reset is noticed and replaced. `what` names the
/// follower in log lines.
pub async fn listen_forever(
    pool: PgPool,
    channel: &str,
    what: &str,
    alive: impl Fn() -> bool,
    mut on: impl FnMut(Notice<'_>) -> bool,
) {
    const IDLE_PROBE: Duration = Duration::from_secs(30);
    let mut pause = Duration::from_millis(200);
    while alive() {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match tokio::time::timeout(Duration::from_secs(10), connected).await {
            Ok(Ok(mut listener)) => {
                pause = Duration::from_millis(200);
                if !on(Notice::Resync) {
                    return;
                }
                while alive() {
                    let keep = match tokio::time::timeout(IDLE_PROBE, listener.try_recv()).await {
                        Ok(Ok(Some(n))) => on(Notice::Payload(n.payload())),
                        // Reconnected by sqlx: notifications may have been missed.
                        Ok(Ok(None)) => on(Notice::Resync),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "{what}: LISTEN connection lost");
                            break;
                        }
                        Err(_) => {
                            let probe = sqlx::query("SELECT 1").execute(&mut listener);
                            if !matches!(tokio::time::timeout(Duration::from_secs(5), probe).await, Ok(Ok(_))) {
                                tracing::warn!("{what}: LISTEN connection does not answer; reconnecting");
                                break;
                            }
                            true
                        }
                    };
                    if !keep {
                        return;
                    }
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "{what}: cannot LISTEN; polling only until it can"),
            Err(_) => tracing::warn!("{what}: LISTEN connect timed out; polling only until it can"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}
