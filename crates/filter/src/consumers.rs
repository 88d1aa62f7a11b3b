//! The Consumers of one config snapshot, indexed by each kind of credential.
//!
//! API keys are indexed by their SHA-256 digest, never by the key itself: a lookup's
//! timing then depends only on a digest the caller cannot steer, and the final
//! comparison is constant-time.

use meshgate_core::Consumer;
use std::collections::HashMap;
use std::sync::Arc;
use subtle::ConstantTimeEq;

type Digest = [u8; 32];

#[derive(Debug, Default)]
pub struct ConsumerSet {
    by_name: HashMap<String, Arc<Consumer>>,
    keys: HashMap<Digest, Arc<Consumer>>,
}

/// Why a credential could not be added.
#[derive(Debug, PartialEq, Eq)]
pub enum Conflict {
    /// Another Consumer (named) already has this key.
    Key(String),
}

fn digest(secret: &[u8]) -> Digest {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl ConsumerSet {
    pub fn add(&mut self, consumer: Consumer) -> Arc<Consumer> {
        let c = Arc::new(consumer);
        self.by_name.insert(c.name.to_string(), c.clone());
        c
    }

    pub fn add_key(&mut self, consumer: &Arc<Consumer>, key: &[u8]) -> Result<(), Conflict> {
        match self.keys.entry(digest(key)) {
            std::collections::hash_map::Entry::Occupied(e) => {
                Err(Conflict::Key(e.get().name.to_string()))
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(consumer.clone());
                Ok(())
            }
        }
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
}
