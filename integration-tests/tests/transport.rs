//! Socket settings of the running services, read back from the kernel: every
//! accepted connection of every gRPC, HTTP and metrics server has
//! TCP_NODELAY. Without it a response that leaves in two writes waits for the
//! client's delayed ACK, ~40 ms per hop (found by the first benchmark).
//!
//! The server side of a connection lives in the service's process, so the
//! test opens a connection, has it served, then duplicates the service's
//! socket into this process (pidfd_getfd, Linux 5.6+; needs the permission to
//! ptrace the service, which the user who started the stack has) and reads
//! the option with getsockopt. No timing is involved.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::{FromRawFd, OwnedFd},
    time::Duration,
};

use adserve_integration_tests::{Stack, listener_pid};
use anyhow::{Context, bail};

/// TCP_NODELAY of `pid`'s socket whose local port is `port` and whose peer
/// is `client`, read via a duplicate of that socket. None if not found (yet).
fn server_side_nodelay(pid: i32, port: u16, client: SocketAddr) -> anyhow::Result<Option<bool>> {
    // SAFETY: raw syscalls; every fd returned is owned (and closed) here.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        bail!("pidfd_open({pid}): {}", std::io::Error::last_os_error());
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    use std::os::fd::AsRawFd as _;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if !is_socket {
            continue;
        }
        let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if dup < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EBADF) {
                continue; // closed meanwhile
            }
            bail!("pidfd_getfd({pid}, {fd}): {err} (the test needs permission to ptrace the service)");
        }
        let dup = unsafe { OwnedFd::from_raw_fd(dup as i32) };
        let sock = socket2::SockRef::from(&dup);
        let local = sock.local_addr().ok().and_then(|a| a.as_socket());
        let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
        if local.map(|a| a.port()) == Some(port) && peer == Some(client) {
            return Ok(Some(sock.tcp_nodelay()?));
        }
    }
    Ok(None)
}

#[derive(Debug, Clone, Copy)]
enum Protocol {
    /// HTTP/1.1 GET of the given path.
    Http(&'static str),
    /// HTTP/2 preface and SETTINGS (what every gRPC connection starts with).
    Grpc,
}

/// Connects, has the connection served (a full request/response exchange),
/// and returns the open client socket.
fn served_connection(addr: SocketAddr, protocol: Protocol) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    match protocol {
        Protocol::Http(path) => {
            write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
            let mut buf = [0u8; 12];
            s.read_exact(&mut buf)?;
            anyhow::ensure!(
                buf.starts_with(b"HTTP/1.") && &buf[9..12] == b"200",
                "GET {path}: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        Protocol::Grpc => {
            s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")?;
            let mut frame = [0u8; 9];
            s.read_exact(&mut frame)?;
            anyhow::ensure!(frame[3] == 4, "expected the server's SETTINGS frame, got type {}", frame[3]);
        }
    }
    Ok(s)
}

fn addr_of(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    Ok(rest.split('/').next().unwrap_or_default().parse()?)
}

#[tokio::test]
async fn every_accepted_connection_has_tcp_nodelay() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let mut servers: Vec<(String, SocketAddr, Protocol)> = vec![
        ("gateway HTTP".into(), addr_of(&s.http)?, Protocol::Http("/healthz")),
        ("gateway gRPC".into(), addr_of(&s.gateway)?, Protocol::Grpc),
        ("feature-service gRPC".into(), addr_of(&s.features)?, Protocol::Grpc),
        ("ranker gRPC".into(), addr_of(&s.ranker)?, Protocol::Grpc),
        ("auction gRPC".into(), addr_of(&s.auction)?, Protocol::Grpc),
        ("label-joiner gRPC".into(), addr_of(&s.joiner)?, Protocol::Grpc),
    ];
    for (name, addr) in &s.metrics {
        servers.push((format!("{name} metrics"), addr.parse()?, Protocol::Http("/metrics")));
    }
    for (name, addr, protocol) in servers {
        let pid = listener_pid(addr.port()).with_context(|| name.clone())?;
        let client = served_connection(addr, protocol).with_context(|| format!("{name} at {addr}"))?;
        let local = client.local_addr()?;
        let mut nodelay = None;
        for _ in 0..50 {
            nodelay = server_side_nodelay(pid, addr.port(), local).with_context(|| name.clone())?;
            if nodelay.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(nodelay, Some(true), "{name} (pid {pid}, {addr}): server side of {local} must have TCP_NODELAY");
    }
    Ok(())
}

/// A frozen ranker (SIGSTOP, as a GC pause or a starved box would hold it)
/// while its caller sends calls and gives up on each at its deadline: the
/// calls are reset before the ranker has read them. Once thawed, the ranker
/// must answer the one call that was patient, on the same connection, rather
/// than close the connection for "too many resets" (h2's default limit of
/// 20, which failed every call on it with RESOURCE_EXHAUSTED).
#[tokio::test]
async fn calls_reset_while_the_ranker_is_frozen_do_not_fail_the_connection() -> anyhow::Result<()> {
    use adserve_proto::v1::{GetModelRequest, ranker_service_client::RankerServiceClient};
    let (mut command, port, _) = adserve_integration_tests::ranker_command(
        &adserve_integration_tests::repo_root().join("models/ctr-baseline"),
        &[],
    );
    let ranker = command.stdout(std::process::Stdio::null()).spawn()?;
    let pid = ranker.id().context("the ranker is running")?.to_string();
    // The gateway's channel settings.
    let channel = adserve_core::net::grpc_endpoint(format!("http://127.0.0.1:{port}"))?;
    let mut client = None;
    for _ in 0..300 {
        if let Ok(c) = channel.connect().await {
            let mut c = RankerServiceClient::new(c);
            if c.get_model(GetModelRequest::default()).await.is_ok() {
                client = Some(c);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let client = client.context("the ranker did not start")?;

    anyhow::ensure!(std::process::Command::new("kill").args(["-STOP", &pid]).status()?.success(), "SIGSTOP {pid}");
    let patient = tokio::spawn({
        let mut client = client.clone();
        async move { client.get_model(GetModelRequest::default()).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let impatient: Vec<_> = (0..200)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_millis(30), client.get_model(GetModelRequest::default())).await
            })
        })
        .collect();
    let mut cancelled = 0;
    for call in impatient {
        cancelled += usize::from(call.await?.is_err());
    }
    anyhow::ensure!(std::process::Command::new("kill").args(["-CONT", &pid]).status()?.success(), "SIGCONT {pid}");
    assert_eq!(cancelled, 200, "a frozen ranker answered");

    let answer = tokio::time::timeout(Duration::from_secs(10), patient).await.context("the patient call hung")??;
    if let Err(status) = answer {
        panic!("the patient call failed with the reset ones: {status}");
    }
    client.clone().get_model(GetModelRequest::default()).await.context("the connection serves after the thaw")?;
    Ok(())
}
