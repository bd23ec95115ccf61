//! `ImageService` for the agent: PullImage. Status codes come from
//! [`crate::service::to_ttrpc`], the agent's one mapping.

use async_trait::async_trait;
use kata_proto::image::{PullImageRequest, PullImageResponse};
use kata_proto::image_ttrpc::ImageService;
use ttrpc::asynchronous::TtrpcContext;

use crate::service::{log_failure, Agent, ServiceError};

#[async_trait]
impl ImageService for Agent {
    async fn pull_image(
        &self,
        _ctx: &TtrpcContext,
        req: PullImageRequest,
    ) -> ttrpc::Result<PullImageResponse> {
        self.images()
            .pull(&req.container_id, &req.image)
            .await
            .map_err(|e| log_failure("PullImage", ServiceError::Image(e)))
    }
}
