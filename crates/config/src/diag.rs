use std::fmt;
use std::sync::Arc;

/// One problem in a config, placed on a line:
/// `FILE:LINE: Kind/name: field.path: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: Arc<str>,
    pub line: u32,
    /// `Kind/name`, or `-` when the document's kind or name could not be read.
    pub resource: String,
    /// Dotted field path (`spec.invoke.service`), or `-` for the whole document.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}: {}",
            self.file, self.line, self.resource, self.path, self.message
        )
    }
}
