//! gRPC face of the label-joiner: status and on-demand flush.

use std::{sync::Arc, time::Duration};

use adserve_proto::v1::{
    FlushRequest, FlushResponse, GetStatusRequest, GetStatusResponse,
    label_joiner_service_server::{LabelJoinerService, LabelJoinerServiceServer},
};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use crate::runner::{self, Command, RunError};

/// Serves `adserve.v1.LabelJoinerService`.
#[derive(Debug, Clone)]
pub struct LabelJoinerGrpc {
    status: Arc<std::sync::Mutex<runner::Status>>,
    commands: mpsc::Sender<Command>,
    output: String,
    admin_token: Arc<str>,
}

impl LabelJoinerGrpc {
    /// A service over the running loop's status and command channel;
    /// `output` is the dataset's location (directory or URL).
    /// `admin_token` authorises `Flush(close_open_windows)`; empty refuses it.
    pub fn new(
        status: Arc<std::sync::Mutex<runner::Status>>,
        commands: mpsc::Sender<Command>,
        output: String,
        admin_token: &str,
    ) -> Self {
        Self { status, commands, output, admin_token: admin_token.into() }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> LabelJoinerServiceServer<Self> {
        LabelJoinerServiceServer::new(self)
    }

    fn authorise_close(&self, request: &Request<FlushRequest>) -> Result<(), Status> {
        if self.admin_token.is_empty() {
            return Err(Status::permission_denied(
                "close_open_windows: disabled on this joiner (no admin_token configured)",
            ));
        }
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if constant_time_eq(presented.as_bytes(), self.admin_token.as_bytes()) {
            Ok(())
        } else {
            Err(Status::permission_denied("close_open_windows: authorization: Bearer <admin_token> required"))
        }
    }
}

/// Compares without returning early on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[tonic::async_trait]
impl LabelJoinerService for LabelJoinerGrpc {
    async fn get_status(&self, _: Request<GetStatusRequest>) -> Result<Response<GetStatusResponse>, Status> {
        let s = self.status.lock().map_err(|_| Status::internal("status lock poisoned"))?.clone();
        let ts = |ms: i64| prost_types::Timestamp {
            seconds: ms.div_euclid(1000),
            nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
        };
        Ok(Response::new(GetStatusResponse {
            pending_impressions: s.pending,
            buffered_rows: s.buffered,
            rows_written: s.rows_written,
            files_written: s.files_written,
            clicks_joined: s.join.clicks_joined,
            late_clicks: s.join.late_clicks,
            clicks_after_close: s.join.clicks_after_close,
            out_of_order_impressions: s.join.out_of_order_impressions,
            out_of_order_clicks: s.join.out_of_order_clicks,
            dead_lettered: s.dead_lettered,
            last_commit: s.last_commit.map(prost_types::Timestamp::from),
            output_dir: self.output.clone(),
            unmatched_clicks: s.join.unmatched_clicks,
            orphan_clicks: s.orphans,
            orphans_evicted: s.join.orphans_evicted,
            duplicates: s.join.duplicates,
            downsampled: s.join.downsampled,
            clicks_before_impression: s.join.clicks_before_impression,
            billings_joined: s.join.billings_joined,
            unbilled: s.join.unbilled,
            late_billings: s.join.late_billings,
            billings_after_close: s.join.billings_after_close,
            unmatched_billings: s.join.unmatched_billings,
            billings_not_expected: s.join.billings_not_expected,
            watermark: s.watermark_ms.map(ts),
            partitions: s.partitions,
            paused: s.paused,
            state_bytes: s.state_bytes,
        }))
    }

    async fn flush(&self, request: Request<FlushRequest>) -> Result<Response<FlushResponse>, Status> {
        if request.get_ref().close_open_windows {
            self.authorise_close(&request)?;
        }
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Flush { close_open_windows: request.into_inner().close_open_windows, reply };
        self.commands.send(cmd).await.map_err(|_| Status::unavailable(RunError::Stopped.to_string()))?;
        let result = tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .map_err(|_| Status::deadline_exceeded("flush did not finish within 30 s"))?
            .map_err(|_| Status::unavailable(RunError::Stopped.to_string()))?;
        let flushed = result.map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(FlushResponse { file: flushed.file.unwrap_or_default(), rows: flushed.rows as u64 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(token: &str) -> LabelJoinerGrpc {
        let (tx, _rx) = mpsc::channel(1);
        LabelJoinerGrpc::new(Arc::default(), tx, "/tmp".into(), token)
    }

    fn close(auth: Option<&str>) -> Request<FlushRequest> {
        let mut r = Request::new(FlushRequest { close_open_windows: true });
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    #[tokio::test]
    async fn closing_open_windows_needs_the_admin_token() {
        let s = service("");
        let e = s.flush(close(Some("Bearer anything-at-all-here"))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("no admin_token"), "{}", e.message());

        let s = service("0123456789abcdef");
        for auth in
            [None, Some("Bearer wrong-token-0000000"), Some("0123456789abcdef"), Some("Bearer 0123456789abcdeF")]
        {
            let e = s.flush(close(auth)).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{auth:?}");
        }
        // The right token gets past authorisation (the loop is gone here, so: unavailable).
        let e = s.flush(close(Some("Bearer 0123456789abcdef"))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }
}
