//! gRPC face of the ranker.

use std::{sync::Arc, time::Instant};

use adserve_proto::v1::{
    GetModelRequest, GetModelResponse, ScoreRequest, ScoreResponse,
    ranker_service_server::{RankerService, RankerServiceServer},
};
use tonic::{Request, Response, Status};

use crate::{CtrModel, ExecutionProvider, model::ModelError};

/// Serves `adserve.v1.RankerService` with one loaded model.
#[derive(Debug, Clone)]
pub struct RankerGrpc {
    model: Arc<CtrModel>,
    max_rows: usize,
}

impl RankerGrpc {
    /// A service scoring with `model`, refusing matrices above `max_rows`.
    pub fn new(model: Arc<CtrModel>, max_rows: usize) -> Self {
        Self { model, max_rows }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> RankerServiceServer<Self> {
        RankerServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl RankerService for RankerGrpc {
    async fn score(&self, request: Request<ScoreRequest>) -> Result<Response<ScoreResponse>, Status> {
        let start = Instant::now();
        let matrix = request.into_inner().matrix.ok_or_else(|| Status::invalid_argument("matrix: required"))?;
        let rows = matrix.num_rows as usize;
        if rows == 0 || rows > self.max_rows {
            return Err(Status::invalid_argument(format!(
                "matrix.num_rows: must be in 1..={}, got {rows}",
                self.max_rows
            )));
        }
        let model = self.model.clone();
        let scores = tokio::task::spawn_blocking(move || model.score(&matrix))
            .await
            .map_err(|e| Status::internal(format!("scoring task failed: {e}")))?
            .map_err(|e| match e {
                ModelError::BadInput(m) => Status::invalid_argument(m),
                other => {
                    tracing::error!(error = %other, "scoring failed");
                    Status::internal(other.to_string())
                }
            })?;
        metrics::histogram!("adserve_ranker_score_seconds").record(start.elapsed().as_secs_f64());
        metrics::histogram!("adserve_ranker_rows").record(rows as f64);
        Ok(Response::new(ScoreResponse { pctr: scores, model_version: self.model.manifest().model_version.clone() }))
    }

    async fn get_model(&self, _: Request<GetModelRequest>) -> Result<Response<GetModelResponse>, Status> {
        let m = self.model.manifest();
        let provider = match self.model.provider() {
            ExecutionProvider::Cpu => "cpu",
            ExecutionProvider::Cuda => "cuda",
            ExecutionProvider::Tensorrt => "tensorrt",
        };
        Ok(Response::new(GetModelResponse {
            model_version: m.model_version.clone(),
            feature_order: m.feature_order.clone(),
            execution_provider: provider.into(),
        }))
    }
}
