//! The Consumers of one config snapshot, indexed by each kind of credential.
//!
//! API keys are indexed by their SHA-256 digest, never by the key itself: a lookup's
//! timing then depends only on a digest the caller cannot steer, and the final
//! comparison is constant-time. HMAC secrets are held only as signing keys.

use meshgate_core::Consumer;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use subtle::ConstantTimeEq;

type Digest = [u8; 32];

/// A Consumer's HMAC signing key, found by its key id.
#[derive(Debug)]
pub struct HmacCredential {
    pub consumer: Arc<Consumer>,
    pub key: aws_lc_rs::hmac::Key,
}

#[derive(Debug, Default)]
pub struct ConsumerSet {
    by_name: HashMap<String, Arc<Consumer>>,
    keys: HashMap<Digest, Arc<Consumer>>,
    hmac: HashMap<String, HmacCredential>,
    /// By issuer, then subject.
    jwt: HashMap<String, HashMap<String, Arc<Consumer>>>,
}

/// A credential another Consumer (named) already holds.
#[derive(Debug, PartialEq, Eq)]
pub struct Conflict(pub String);

fn digest(secret: &[u8]) -> Digest {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Insert unless the slot is taken; a taken slot names its holder.
fn claim<K: std::hash::Hash + Eq, V>(
    map: &mut HashMap<K, V>,
    key: K,
    value: V,
    holder: impl Fn(&V) -> &Arc<Consumer>,
) -> Result<(), Conflict> {
    match map.entry(key) {
        Entry::Occupied(e) => Err(Conflict(holder(e.get()).name.to_string())),
        Entry::Vacant(v) => {
            v.insert(value);
            Ok(())
        }
    }
}

impl ConsumerSet {
    pub fn add(&mut self, consumer: Consumer) -> Arc<Consumer> {
        let c = Arc::new(consumer);
        self.by_name.insert(c.name.to_string(), c.clone());
        c
    }

    pub fn add_key(&mut self, consumer: &Arc<Consumer>, key: &[u8]) -> Result<(), Conflict> {
        claim(&mut self.keys, digest(key), consumer.clone(), |c| c)
    }

    pub fn add_hmac(
        &mut self,
        consumer: &Arc<Consumer>,
        key_id: &str,
        secret: &[u8],
    ) -> Result<(), Conflict> {
        let cred = HmacCredential {
            consumer: consumer.clone(),
            key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret),
        };
        claim(&mut self.hmac, key_id.to_string(), cred, |c| &c.consumer)
    }

    pub fn add_jwt(
        &mut self,
        consumer: &Arc<Consumer>,
        issuer: &str,
        subject: &str,
    ) -> Result<(), Conflict> {
        let subjects = self.jwt.entry(issuer.to_string()).or_default();
        claim(subjects, subject.to_string(), consumer.clone(), |c| c)
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<Consumer>> {
        self.by_name.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The Consumer holding API key `key`.
    pub fn by_key(&self, key: &[u8]) -> Option<&Arc<Consumer>> {
        let d = digest(key);
        let (stored, c) = self.keys.get_key_value(&d)?;
        bool::from(stored.ct_eq(&d)).then_some(c)
    }

    /// The HMAC credential with this key id.
    pub fn by_hmac_key_id(&self, key_id: &str) -> Option<&HmacCredential> {
        self.hmac.get(key_id)
    }

    /// The Consumer a verified JWT's `iss` and `sub` name.
    pub fn by_jwt(&self, issuer: &str, subject: &str) -> Option<&Arc<Consumer>> {
        self.jwt.get(issuer)?.get(subject)
    }
}
