//! gRPC API: `adserve.v1.GatewayService`, the same operations as HTTP.

use adserve_proto::v1::{
    GetAdsRequest, GetAdsResponse, RecordClickRequest, RecordClickResponse,
    gateway_service_server::{GatewayService, GatewayServiceServer},
};
use tonic::{Request, Response, Status};

use crate::{
    AdServer,
    error::{Api, record},
};

/// Serves `adserve.v1.GatewayService`.
#[derive(Debug, Clone)]
pub struct GatewayGrpc(pub AdServer);

impl GatewayGrpc {
    /// The tonic server for this service.
    pub fn into_server(self) -> GatewayServiceServer<Self> {
        GatewayServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl GatewayService for GatewayGrpc {
    async fn get_ads(&self, request: Request<GetAdsRequest>) -> Result<Response<GetAdsResponse>, Status> {
        // The caller's grpc-timeout is part of the request's budget.
        let caller_deadline = adserve_core::grpc::caller_timeout(request.metadata());
        let result = self.0.serve(request.into_inner(), caller_deadline).await;
        record(Api::Grpc, "ads", &result);
        Ok(Response::new(result?))
    }

    async fn record_click(
        &self,
        request: Request<RecordClickRequest>,
    ) -> Result<Response<RecordClickResponse>, Status> {
        let result = self.0.click(request.into_inner()).await;
        record(Api::Grpc, "clicks", &result);
        Ok(Response::new(result?))
    }
}
