//! gRPC face of the label-joiner: status and on-demand flush.

use std::{path::PathBuf, sync::Arc, time::Duration};

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
    output_dir: PathBuf,
}

impl LabelJoinerGrpc {
    /// A service over the running loop's status and command channel.
    pub fn new(
        status: Arc<std::sync::Mutex<runner::Status>>,
        commands: mpsc::Sender<Command>,
        output_dir: PathBuf,
    ) -> Self {
        Self { status, commands, output_dir }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> LabelJoinerServiceServer<Self> {
        LabelJoinerServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl LabelJoinerService for LabelJoinerGrpc {
    async fn get_status(&self, _: Request<GetStatusRequest>) -> Result<Response<GetStatusResponse>, Status> {
        let s = self.status.lock().map_err(|_| Status::internal("status lock poisoned"))?.clone();
        Ok(Response::new(GetStatusResponse {
            pending_impressions: s.pending,
            buffered_rows: s.buffered,
            rows_written: s.rows_written,
            files_written: s.files_written,
            clicks_joined: s.clicks_joined,
            late_clicks: s.late_clicks,
            dead_lettered: s.dead_lettered,
            last_commit: s.last_commit.map(prost_types::Timestamp::from),
            output_dir: self.output_dir.display().to_string(),
        }))
    }

    async fn flush(&self, request: Request<FlushRequest>) -> Result<Response<FlushResponse>, Status> {
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Flush { close_open_windows: request.into_inner().close_open_windows, reply };
        self.commands.send(cmd).await.map_err(|_| Status::unavailable(RunError::Stopped.to_string()))?;
        let result = tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .map_err(|_| Status::deadline_exceeded("flush did not finish within 30 s"))?
            .map_err(|_| Status::unavailable(RunError::Stopped.to_string()))?;
        let flushed = result.map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(FlushResponse {
            file: flushed.file.map(|p| p.display().to_string()).unwrap_or_default(),
            rows: flushed.rows as u64,
        }))
    }
}
