use crate::{Filter, FilterResult, Flow, Step};
use meshgate_core::RequestCtx;
use std::sync::Arc;

/// The ordered filters of one Api, compiled once per snapshot and shared by every
/// request routed to that Api.
#[derive(Clone, Default)]
pub struct Chain {
    filters: Vec<Arc<dyn Filter>>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.filters.iter().map(|x| x.name()))
            .finish()
    }
}

impl Chain {
    pub fn new(filters: Vec<Arc<dyn Filter>>) -> Self {
        Self { filters }
    }

    pub fn len(&self) -> usize {
        self.filters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.filters.iter().map(|f| f.name()).collect()
    }

    pub fn filters(&self) -> &[Arc<dyn Filter>] {
        &self.filters
    }

    /// Whether a filter in `range` identifies the caller as a Consumer.
    pub fn identifies(&self, range: std::ops::Range<usize>) -> bool {
        self.filters
            .get(range)
            .is_some_and(|fs| fs.iter().any(|f| f.identifies()))
    }

    /// Run `on_request` in order; stop at the first filter that answers or fails.
    pub async fn on_request(
        &self,
        ctx: &mut RequestCtx,
        req: &mut http::request::Parts,
    ) -> FilterResult {
        self.on_request_range(ctx, req, 0..self.filters.len()).await
    }

    /// [`Chain::on_request`] for the filters in `range` only: a grey release keyed
    /// on the Consumer runs the filters both revisions share, then chooses.
    pub async fn on_request_range(
        &self,
        ctx: &mut RequestCtx,
        req: &mut http::request::Parts,
        range: std::ops::Range<usize>,
    ) -> FilterResult {
        for f in self.filters.get(range).unwrap_or_default() {
            let out = match f.on_request(ctx, req) {
                Step::Done(r) => r,
                Step::Pending(fut) => fut.await,
            };
            match out {
                Ok(Flow::Continue) => {}
                other => return other,
            }
        }
        Ok(Flow::Continue)
    }

    /// Does any filter need the buffered request body?
    pub fn wants_body(&self) -> bool {
        self.filters.iter().any(|f| f.wants_body())
    }

    /// Run `on_body` in order for the filters that asked for the body.
    pub fn on_body(
        &self,
        ctx: &mut RequestCtx,
        req: &http::request::Parts,
        body: &bytes::Bytes,
    ) -> FilterResult {
        for f in self.filters.iter().filter(|f| f.wants_body()) {
            match f.on_body(ctx, req, body)? {
                Flow::Continue => {}
                other => return Ok(other),
            }
        }
        Ok(Flow::Continue)
    }

    /// Run `on_response` in reverse order.
    pub fn on_response(&self, ctx: &RequestCtx, resp: &mut http::response::Parts) {
        for f in self.filters.iter().rev() {
            f.on_response(ctx, resp);
        }
    }

    pub fn on_complete(&self, ctx: &RequestCtx, status: http::StatusCode) {
        for f in &self.filters {
            f.on_complete(ctx, status);
        }
    }
}
