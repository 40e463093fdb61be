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

/// The API key a call presents in its metadata (see [`crate::auth`]).
fn api_key<T>(request: &Request<T>) -> Option<&str> {
    crate::auth::presented(|name| request.metadata().get(name).and_then(|v| v.to_str().ok()))
}

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
        let result = match self.0.admit(api_key(&request)) {
            Ok(()) => self.0.serve(request.into_inner(), caller_deadline).await,
            Err(refused) => Err(refused),
        };
        record(Api::Grpc, "ads", &result);
        Ok(Response::new(result?))
    }

    async fn record_click(
        &self,
        request: Request<RecordClickRequest>,
    ) -> Result<Response<RecordClickResponse>, Status> {
        let result = match self.0.admit(api_key(&request)) {
            Ok(()) => self.0.click(request.into_inner()).await,
            Err(refused) => Err(refused),
        };
        record(Api::Grpc, "clicks", &result);
        Ok(Response::new(result?))
    }
}
