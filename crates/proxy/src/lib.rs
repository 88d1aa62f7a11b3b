//! placeholder
mod body;
mod guard;
use std::path::PathBuf;
#[derive(Debug)]
pub struct Options { pub config: Vec<PathBuf> }
pub async fn run(_o: Options, _s: meshgate_config::Snapshot) -> Result<(), std::io::Error> { Ok(()) }
