//! Filters that decide by where a request comes from: the client's address and the
//! browser origin.

mod cors;
mod ip_restriction;

pub use cors::Cors;
pub use ip_restriction::IpRestriction;
