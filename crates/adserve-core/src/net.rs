//! Per-connection transport settings of every adserve server and client, in
//! one place.
//!
//! Why this module exists: tonic's `Server::tcp_nodelay` applies only to
//! sockets tonic binds itself, and axum sets nothing on accepted sockets. A
//! server fed from a plain `TcpListener` therefore ran with Nagle's algorithm
//! on, and every response that left in two writes waited for the peer's
//! delayed ACK (~40 ms on Linux). Every listener of the project is wrapped
//! here, and every outgoing gRPC channel is built here, so the settings
//! cannot drift apart again.

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Endpoint, Server, server::TcpIncoming};

/// TCP keep-alive idle time on every accepted and dialled socket: a peer that
/// vanished without a FIN (power loss, cable pull) is noticed by the kernel.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// HTTP/2 PING interval on gRPC connections. A peer that is frozen (SIGSTOP,
/// a GC pause, a full disk) keeps its TCP connection open; the PING is what
/// notices, so a client fails fast and reconnects instead of queueing behind it.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How long a PING may go unanswered before the connection is closed.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP/2 per-stream flow-control window. The largest message on the request
/// path is a feature matrix (5000 rows x ~100 features x 4 bytes = 2 MB); the
/// HTTP/2 default of 64 KiB would make the sender wait for a WINDOW_UPDATE
/// round trip per 64 KiB.
pub const HTTP2_STREAM_WINDOW: u32 = 4 * 1024 * 1024;

/// HTTP/2 per-connection flow-control window: room for several concurrent
/// large streams on one multiplexed connection.
pub const HTTP2_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Calls a client may have reset before the server's connection loop picked
/// them up, queued at once on one connection, before h2 closes the
/// connection with GOAWAY(ENHANCE_YOUR_CALM), on listeners whose callers are
/// adserve's own services ([`Callers::Internal`]).
///
/// h2's default, 20, is its defence against "rapid reset" floods
/// (CVE-2023-44487). It also fires on an honest caller: when a server is
/// starved or frozen, every call whose deadline passes meanwhile is reset
/// before the server picks it up, and the 21st fails every call on the
/// connection, those that would have been answered included, with
/// RESOURCE_EXHAUSTED ("h2 protocol error"). The gateway calls the ranker
/// with deadlines of tens of milliseconds at hundreds of calls a second, so
/// a 100 ms stall was enough. 4096 covers a 10 s freeze at 400 calls a
/// second. The gateway's public gRPC listener ([`Callers::Public`]) keeps
/// h2's default.
pub const HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 4096;

/// Streams one connection may have open at once on the gateway's public gRPC
/// listener ([`Callers::Public`]), advertised in HTTP/2 SETTINGS; a client
/// queues calls beyond it on its side (or opens another connection). tonic
/// leaves it unlimited, so one connection could take every one of the
/// listener's `server.max_concurrent_requests` slots (1024 by default) and
/// leave other callers only refusals. hyper's own default is 200. Internal listeners keep no
/// limit: the gateway multiplexes all its calls to a service over one channel,
/// and the listener's admission gate bounds them.
pub const HTTP2_PUBLIC_MAX_CONCURRENT_STREAMS: u32 = 256;

/// Who calls a gRPC listener, which decides how much h2 trusts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callers {
    /// adserve's own services only (the ranker, feature-service, auction and
    /// label-joiner listeners): calls they reset unread are tolerated up to
    /// [`HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS`].
    Internal,
    /// Anyone on the network (the gateway's gRPC API): h2's own rapid-reset
    /// defence applies unchanged, and one connection has at most
    /// [`HTTP2_PUBLIC_MAX_CONCURRENT_STREAMS`] calls open.
    Public,
}

/// Calls a gRPC client gave up on (reset) that h2 remembers at once per
/// connection (each for about a second), so that an answer already on its
/// way is dropped quietly. h2 remembers at most 50 by default and forgets
/// the newest beyond that; a frame for a reset stream it does not remember
/// is answered with a reset of its own, which counts toward a per-connection
/// *lifetime* limit (see [`grpc_endpoint`]).
pub const HTTP2_REMEMBERED_RESETS: usize = 4096;

/// How long dialling a gRPC upstream may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Applies the accepted-socket settings: `TCP_NODELAY` and TCP keep-alive.
/// Failures are logged, not fatal: the connection still works, only slower.
pub fn configure_accepted(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
    }
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::warn!(error = %e, "cannot set TCP keep-alive on an accepted connection");
    }
}

/// The accepted-connection stream for a tonic server on `listener`.
pub fn grpc_incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(Some(TCP_KEEPALIVE))
}

/// A tonic server builder with the project's HTTP/2 settings for a listener
/// called by `callers`. Socket options come from [`grpc_incoming`]: the
/// builder's own `tcp_nodelay` and `tcp_keepalive` apply only to sockets
/// tonic binds itself, which we never do.
pub fn grpc_server(callers: Callers) -> Server {
    let builder = Server::builder()
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT));
    match callers {
        Callers::Internal => {
            builder.http2_max_pending_accept_reset_streams(Some(HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS))
        }
        Callers::Public => builder.max_concurrent_streams(Some(HTTP2_PUBLIC_MAX_CONCURRENT_STREAMS)),
    }
}

/// An axum listener on `listener` whose accepted sockets get
/// [`configure_accepted`].
pub fn http_listener(listener: TcpListener) -> impl axum::serve::Listener<Io = TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt as _;
    listener.tap_io(|stream| configure_accepted(stream))
}

/// A gRPC channel endpoint for `url` with the project's client settings:
/// `TCP_NODELAY`, keep-alive (TCP and HTTP/2, also while idle) and the same
/// flow-control windows as the servers.
///
/// h2's limit on "local error resets" (1024 per connection, never reset) is
/// off. It guards against a hostile server; every channel built here dials
/// an adserve service. With it on, answers that crossed calls the gateway
/// gave up on at their deadline added up over the connection's life, and the
/// 1025th closed the connection with GOAWAY(ENHANCE_YOUR_CALM,
/// "too_many_internal_resets"): every call in flight on it failed with
/// RESOURCE_EXHAUSTED, seconds into an overload or hours into a quiet day.
pub fn grpc_endpoint(url: impl Into<String>) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.into())?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .tcp_keepalive(Some(TCP_KEEPALIVE))
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .http2_keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .http2_max_concurrent_reset_streams(HTTP2_REMEMBERED_RESETS)
        .http2_max_local_error_reset_streams(None))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        net::SocketAddr,
        os::fd::{BorrowedFd, RawFd},
    };

    /// Reads `TCP_NODELAY` back (getsockopt) from the server side of the
    /// connection `client` -> `server`, found among this process's open file
    /// descriptors. None when no such socket is open (yet).
    pub(crate) fn server_side_nodelay(server: SocketAddr, client: SocketAddr) -> Option<bool> {
        for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
            let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse::<RawFd>().ok()) else { continue };
            let is_socket = std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
            if !is_socket {
                continue;
            }
            // SAFETY: `fd` is open in this process for the duration of the
            // check (the connection is held open by the caller); the borrow
            // does not outlive this iteration and never closes it.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let sock = socket2::SockRef::from(&fd);
            let local = sock.local_addr().ok().and_then(|a| a.as_socket());
            let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
            if local == Some(server) && peer == Some(client) {
                return sock.tcp_nodelay().ok();
            }
        }
        None
    }

    /// Polls [`server_side_nodelay`] until the server has accepted.
    pub(crate) async fn wait_server_side_nodelay(server: SocketAddr, client: SocketAddr) -> bool {
        for _ in 0..200 {
            if let Some(v) = server_side_nodelay(server, client) {
                return v;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the server never accepted {client} -> {server}");
    }

    #[tokio::test]
    async fn http_listener_sets_nodelay_on_served_connections() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(async move { axum::serve(super::http_listener(listener), app).await });
        let mut client = tokio::net::TcpStream::connect(server).await.unwrap();
        // A full request/response: the connection is being served, not just accepted.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = client.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
        assert!(wait_server_side_nodelay(server, client.local_addr().unwrap()).await);
    }

    #[tokio::test]
    async fn a_plain_listener_does_not_set_nodelay() {
        // The control: proves the check above can fail (Linux accepts sockets
        // with Nagle on), so a passing test means the wrapper did its job.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = tokio::net::TcpStream::connect(server).await.unwrap();
        assert!(!wait_server_side_nodelay(server, client.local_addr().unwrap()).await);
    }
}
