//! What one client may make a server spend: the limits every listener enforces, and the request middleware that
//! bounds bodies, requests in flight and time per request.
//!
//! Bodies up to `small_body_bytes` (every real pod review) are read at once; larger ones first reserve their
//! size from a shared budget of large-body bytes, so clients that send big bodies and stall can hold at most
//! that budget, never crowd out the small reviews, and are cut off by the request deadline.

use std::{sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Server limits, as flags (and chart values).
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Seconds a client has to send a request's headers, counted from when the server waits for them: it also
    /// closes idle HTTP/1 keep-alive connections after this long.
    #[arg(long, env = "KEEPALIVE_HEADER_READ_TIMEOUT_SECONDS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub header_read_timeout_seconds: u64,
    /// Seconds to receive and answer one request (keep it below the webhook's timeoutSeconds).
    #[arg(long, env = "KEEPALIVE_REQUEST_TIMEOUT_SECONDS", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub request_timeout_seconds: u64,
    /// Open connections per listener; beyond them new connections wait in the kernel's accept queue.
    #[arg(long, env = "KEEPALIVE_MAX_CONNECTIONS", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Concurrent HTTP/2 streams per connection.
    #[arg(long, env = "KEEPALIVE_MAX_CONCURRENT_STREAMS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_concurrent_streams: u32,
    /// Requests in flight at once; more are answered 503 at once.
    #[arg(long, env = "KEEPALIVE_MAX_REQUESTS_IN_FLIGHT", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_requests_in_flight: u32,
    /// Largest request body: an AdmissionReview of the largest pod the apiserver accepts (its request limit is
    /// 3 MiB) with room for the review around it.
    #[arg(long, env = "KEEPALIVE_MAX_BODY_BYTES", default_value_t = 4 << 20, value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_body_bytes: u32,
    /// Bodies up to this size are read without reserving from the large-body budget.
    #[arg(long, env = "KEEPALIVE_SMALL_BODY_BYTES", default_value_t = 64 << 10, value_parser = clap::value_parser!(u32).range(1024..))]
    pub small_body_bytes: u32,
    /// Bytes of larger bodies held in memory at once, over all requests.
    #[arg(long, env = "KEEPALIVE_LARGE_BODY_BUDGET_BYTES", default_value_t = 16 << 20, value_parser = clap::value_parser!(u32).range(1024..))]
    pub large_body_budget_bytes: u32,
}

impl Default for LimitArgs {
    fn default() -> Self {
        LimitArgs {
            header_read_timeout_seconds: 20,
            request_timeout_seconds: 4,
            max_connections: 2048,
            max_concurrent_streams: 32,
            max_requests_in_flight: 512,
            max_body_bytes: 4 << 20,
            small_body_bytes: 64 << 10,
            large_body_budget_bytes: 16 << 20,
        }
    }
}

impl LimitArgs {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_seconds)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_seconds)
    }
}

/// The shared state of the request middleware.
#[derive(Clone)]
pub struct RequestLimits {
    args: Arc<LimitArgs>,
    in_flight: Arc<Semaphore>,
    large_bodies: Arc<Semaphore>,
}

impl RequestLimits {
    pub fn new(args: &LimitArgs) -> Self {
        RequestLimits {
            args: Arc::new(args.clone()),
            in_flight: Arc::new(Semaphore::new(args.max_requests_in_flight as usize)),
            // At least one largest body fits, or it would wait forever.
            large_bodies: Arc::new(Semaphore::new(
                args.large_body_budget_bytes.max(args.max_body_bytes) as usize
            )),
        }
    }

    /// Wraps `router` (its routes see bodies already read, within the limits).
    pub fn apply(&self, router: axum::Router) -> axum::Router {
        router
            .layer(axum::middleware::from_fn_with_state(self.clone(), limit))
            .layer(axum::extract::DefaultBodyLimit::max(self.args.max_body_bytes as usize))
    }
}

fn refuse(status: StatusCode, why: &str) -> Response {
    let mut response = (status, axum::Json(serde_json::json!({ "error": why }))).into_response();
    if status != StatusCode::SERVICE_UNAVAILABLE {
        // The client misbehaved: do not keep its connection.
        response
            .headers_mut()
            .insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    }
    response
}

/// The middleware: a slot among the requests in flight, the body read within the limits, and the whole
/// request within the deadline.
async fn limit(State(limits): State<RequestLimits>, request: Request, next: Next) -> Response {
    let Ok(_slot) = limits.in_flight.clone().try_acquire_owned() else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "too many requests in flight");
    };
    let deadline = tokio::time::Instant::now() + limits.args.request_timeout();
    let (parts, body) = request.into_parts();
    let (bytes, _reserved) = match tokio::time::timeout_at(deadline, read_body(&limits, &parts.headers, body)).await {
        Ok(Ok(read)) => read,
        Ok(Err(refusal)) => return refusal,
        Err(_) => return refuse(StatusCode::REQUEST_TIMEOUT, "request body not received in time"),
    };
    let request = Request::from_parts(parts, Body::from(bytes));
    match tokio::time::timeout_at(deadline, next.run(request)).await {
        Ok(response) => response,
        Err(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "request not answered in time"),
    }
}

/// Reads a whole body: refused beyond `max_body_bytes`; beyond `small_body_bytes`, only with bytes reserved from
/// the large-body budget (waiting for them, within the request's deadline).
async fn read_body(
    limits: &RequestLimits,
    headers: &axum::http::HeaderMap,
    body: Body,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), Response> {
    let max = limits.args.max_body_bytes as usize;
    let small = limits.args.small_body_bytes as usize;
    let too_large = || refuse(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let mut reserved: Option<OwnedSemaphorePermit> = None;
    // A large declared body reserves its size before anything is read.
    if let Some(n) = declared.filter(|n| *n > small) {
        reserve(&limits.large_bodies, &mut reserved, n).await;
    }
    let mut buf = Vec::with_capacity(declared.unwrap_or(0).min(small));
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| refuse(StatusCode::BAD_REQUEST, "request body could not be read"))?;
        let Ok(data) = frame.into_data() else { continue };
        let total = buf.len() + data.len();
        if total > max || declared.is_some_and(|n| total > n) {
            return Err(too_large());
        }
        // A body of unknown length that grows past the small size reserves as it grows, in steps.
        if total > small && total > reserved.as_ref().map_or(0, |p| p.num_permits()) {
            reserve(
                &limits.large_bodies,
                &mut reserved,
                total.next_multiple_of(small).min(max),
            )
            .await;
        }
        buf.extend_from_slice(&data);
    }
    Ok((Bytes::from(buf), reserved))
}

/// Grows the reservation to `total` bytes of the budget, waiting for them.
async fn reserve(budget: &Arc<Semaphore>, reserved: &mut Option<OwnedSemaphorePermit>, total: usize) {
    let held = reserved.as_ref().map_or(0, |p| p.num_permits());
    let Ok(more) = u32::try_from(total.saturating_sub(held)) else {
        return;
    };
    if more == 0 {
        return;
    }
    // The budget is never closed: acquiring fails only if it were.
    if let Ok(permit) = budget.clone().acquire_many_owned(more).await {
        match reserved {
            Some(r) => r.merge(permit),
            None => *reserved = Some(permit),
        }
    }
}
