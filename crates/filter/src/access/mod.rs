//! Filters that decide by where a request comes from: the client's address, the
//! browser origin, and the caller's mesh identity.

mod authz;
mod cors;
mod ip_restriction;

pub use authz::Authz;
pub use cors::Cors;
pub use ip_restriction::IpRestriction;
