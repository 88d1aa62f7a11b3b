//! JSON Web Key Sets: parsing (RFC 7517), and the three places keys come from —
//! inline, a file read when the config is compiled, or a URL fetched and refreshed.
//!
//! A remote set is fetched lazily by the first request that needs it (no task
//! outlives its config snapshot), refreshed in the background once it is older than
//! `refresh`, and refetched at once, at most every [`MIN_REFETCH`], when a token names a
//! `kid` the set lacks. A failed fetch keeps the last good keys.

use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// An unknown `kid` refetches the set at most this often (or every `refresh`, when
/// that is shorter), so a flood of made-up key ids cannot turn into a flood of
/// requests to the identity provider.
const MIN_REFETCH: Duration = Duration::from_secs(10);

/// A key usable for verifying signatures.
pub struct Key {
    pub kid: Option<String>,
    /// The key's own `alg`, when it declares one: only that algorithm may use it.
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("family", &self.key.family())
            .finish()
    }
}

/// The verification keys of one JWKS. `generation` changes whenever the set is
/// replaced, so verdicts cached under an older set are checked again.
#[derive(Debug)]
pub struct KeySet {
    pub keys: Vec<Key>,
    pub generation: u64,
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

impl KeySet {
    /// Parse a JWKS document. Keys that cannot verify signatures (`use` other than
    /// `sig`, `key_ops` without `verify`, unsupported types or curves) are left out;
    /// a set with no usable key at all is an error.
    pub fn parse(doc: &[u8]) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_slice(doc).map_err(|e| format!("not a JWKS: {e}"))?;
        let list = value
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or("not a JWKS: no \"keys\" array")?;
        let mut keys = Vec::new();
        for raw in list {
            if let Some(k) = usable(raw) {
                keys.push(k);
            }
        }
        if keys.is_empty() {
            return Err("the JWKS has no key that can verify signatures".into());
        }
        Ok(Self {
            keys,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Keys that may verify a token signed with `alg` and naming `kid`. A key with a
    /// different `kid` is skipped; a key without one is still tried (as Envoy does),
    /// since many key sets name no kids while tokens carry them.
    pub fn candidates<'a>(
        &'a self,
        alg: Algorithm,
        kid: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys.iter().filter(move |k| {
            !matches!((kid, k.kid.as_deref()), (Some(want), Some(have)) if want != have)
                && k.alg.is_none_or(|a| a == alg)
                && k.key.family() == alg.family()
        })
    }

    /// Could a key of this set answer to `kid`? (A set with kid-less keys always could.)
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys
            .iter()
            .any(|k| k.kid.as_deref().is_none_or(|have| have == kid))
    }
}

fn usable(raw: &serde_json::Value) -> Option<Key> {
    if raw.get("use").is_some_and(|u| u != "sig") {
        return None;
    }
    if let Some(ops) = raw.get("key_ops")
        && !ops
            .as_array()
            .is_some_and(|o| o.iter().any(|x| x == "verify"))
    {
        return None;
    }
    // An "alg" this build cannot use (ES512, RSA-OAEP) disqualifies the key rather
    // than widening it to every algorithm.
    let alg = match raw.get("alg") {
        None => None,
        Some(a) => Some(Algorithm::from_str(a.as_str()?).ok()?),
    };
    let jwk: Jwk = serde_json::from_value(raw.clone()).ok()?;
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    if let Some(a) = alg
        && a.family() != key.family()
    {
        return None;
    }
    Some(Key {
        kid: raw.get("kid").and_then(|k| k.as_str()).map(String::from),
        alg,
        key,
    })
}

/// Where a provider's keys come from.
#[derive(Debug)]
pub enum Source {
    Static(Arc<KeySet>),
    Remote(Arc<Remote>),
}

#[derive(Debug)]
pub struct Remote {
    pub uri: String,
    pub refresh: Duration,
    client: reqwest::Client,
    current: ArcSwapOption<KeySet>,
    fetched_at: std::sync::Mutex<Option<Instant>>,
    /// One fetch at a time; waiters see its result.
    fetching: tokio::sync::Mutex<()>,
}

impl Remote {
    pub fn new(uri: String, refresh: Duration, client: reqwest::Client) -> Self {
        Self {
            uri,
            refresh,
            client,
            current: ArcSwapOption::empty(),
            fetched_at: std::sync::Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// The keys held now, if any fetch has succeeded.
    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.current.load_full()
    }

    fn last_fetch(&self) -> Option<Instant> {
        *self.fetched_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when the held keys are older than `refresh`.
    pub fn stale(&self) -> bool {
        self.last_fetch()
            .is_none_or(|t| t.elapsed() >= self.refresh)
    }

    /// May an unknown `kid` trigger a fetch now?
    pub fn may_refetch(&self) -> bool {
        let gap = self.refresh.min(MIN_REFETCH);
        self.last_fetch().is_none_or(|t| t.elapsed() >= gap)
    }

    /// Fetch the set unless another caller did since `seen` (the generation this
    /// caller saw). Failures keep the last good keys and are logged.
    pub async fn fetch(&self, seen: Option<u64>) -> Option<Arc<KeySet>> {
        let _one = self.fetching.lock().await;
        let now = self.current();
        if now.as_ref().map(|k| k.generation) != seen {
            return now;
        }
        // Counted as an attempt even when it fails: the backoff for unknown kids
        // also protects a failing identity provider.
        *self.fetched_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        match self.download().await {
            Ok(set) => {
                tracing::info!(uri = %self.uri, keys = set.keys.len(), "JWKS fetched");
                let set = Arc::new(set);
                self.current.store(Some(set.clone()));
                Some(set)
            }
            Err(e) => {
                tracing::warn!(uri = %self.uri, error = %e, "JWKS fetch failed; keeping the last good keys");
                now
            }
        }
    }

    async fn download(&self) -> Result<KeySet, String> {
        let resp = self
            .client
            .get(&self.uri)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let body = resp.bytes().await.map_err(|e| e.to_string())?;
        KeySet::parse(&body)
    }
}
