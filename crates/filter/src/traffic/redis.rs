//! The Redis connection that cluster-scope filters (`rate-limit`, `quota`) share the
//! shape of: `redis: {url, password, timeout}` and `failMode: open | closed`.

use super::Counters;
use crate::registry::{BuildCtx, BuildError};
use crate::{FilterResult, Flow};
use meshgate_core::{ErrorCode, GatewayError};
use serde::Deserialize;
use std::sync::OnceLock;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RedisConfig {
    url: String,
    #[serde(default)]
    password: Option<serde_json::Value>,
    #[serde(default)]
    timeout: Option<String>,
}

/// What a filter does when its Redis cannot answer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum FailMode {
    #[default]
    Open,
    Closed,
}

/// Result indexes both cluster filters give their fail-mode outcomes in metrics.
const FAILED_OPEN: usize = 2;
const FAILED_CLOSED: usize = 3;

impl FailMode {
    /// The answer when Redis could not be asked about `what` (`rate limit`, `quota`):
    /// admit or refuse, counted and logged.
    pub(super) fn answer(self, counters: &Counters, what: &str, error: &str) -> FilterResult {
        match self {
            Self::Open => {
                counters.record(FAILED_OPEN);
                tracing::warn!(
                    error,
                    "{what} store unreachable; admitting (failMode: open)"
                );
                Ok(Flow::Continue)
            }
            Self::Closed => {
                counters.record(FAILED_CLOSED);
                tracing::warn!(
                    error,
                    "{what} store unreachable; refusing (failMode: closed)"
                );
                Err(GatewayError::new(
                    ErrorCode::RateLimitUnavailable,
                    format!("the {what} cannot be checked right now"),
                ))
            }
        }
    }
}

/// A lazily connected, self-reconnecting Redis connection with a deadline per call.
#[derive(Debug)]
pub(super) struct Redis {
    client: redis::Client,
    conn: OnceLock<redis::aio::ConnectionManager>,
    pub(super) timeout: Duration,
}

impl Redis {
    pub(super) fn from_config(r: &RedisConfig, ctx: BuildCtx<'_>) -> Result<Self, BuildError> {
        let info = redis::IntoConnectionInfo::into_connection_info(r.url.as_str())
            .map_err(|e| BuildError::new("config.redis.url", format!("not a Redis URL: {e}")))?;
        if info.redis_settings().password().is_some() {
            return Err(BuildError::new(
                "config.redis.url",
                "put the password in redis.password ({env: NAME} or {file: PATH}), not in the URL, which /config shows",
            ));
        }
        let mut settings = info.redis_settings().clone();
        if let Some(p) = &r.password {
            let secret = crate::filter_secret(p, "config.redis.password", ctx.base)?;
            settings = settings.set_password(secret);
        }
        let info = info.set_redis_settings(settings);
        let client = redis::Client::open(info)
            .map_err(|e| BuildError::new("config.redis.url", e.to_string()))?;
        let timeout = crate::duration_or(
            "config.redis.timeout",
            r.timeout.as_deref(),
            Duration::from_millis(100),
        )?;
        Ok(Self {
            client,
            conn: OnceLock::new(),
            timeout,
        })
    }

    fn connection(&self) -> Result<redis::aio::ConnectionManager, String> {
        if let Some(c) = self.conn.get() {
            return Ok(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let c = redis::aio::ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(|e| e.to_string())?;
        Ok(self.conn.get_or_init(|| c).clone())
    }

    /// Run a prepared script call within the timeout.
    pub(super) async fn invoke<T: redis::FromRedisValue>(
        &self,
        call: redis::ScriptInvocation<'_>,
    ) -> Result<T, String> {
        let mut conn = self.connection()?;
        tokio::time::timeout(self.timeout, call.invoke_async(&mut conn))
            .await
            .map_err(|_| format!("no answer from Redis within {:?}", self.timeout))?
            .map_err(|e| e.to_string())
    }
}
