//! One JSON line per request, written by a background task so a slow disk or pipe
//! never blocks requests; lines that do not fit the queue are counted and dropped.

use meshgate_config::AccessLog;
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

const QUEUE: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct LogSink {
    tx: mpsc::Sender<String>,
    dropped: Counter,
}

impl LogSink {
    pub fn write(&self, line: String) {
        if self.tx.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}

/// Writers by target, kept across reloads so a reload does not reopen files.
#[derive(Debug, Default)]
pub struct Loggers {
    sinks: Mutex<HashMap<AccessLog, LogSink>>,
}

impl Loggers {
    pub fn sink(&self, target: &AccessLog, dropped: &Counter) -> Option<LogSink> {
        if *target == AccessLog::Off {
            return None;
        }
        let mut sinks = self.sinks.lock().ok()?;
        if let Some(s) = sinks.get(target) {
            return Some(s.clone());
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let sink = LogSink {
            tx,
            dropped: dropped.clone(),
        };
        tokio::spawn(writer(target.clone(), rx));
        sinks.insert(target.clone(), sink.clone());
        Some(sink)
    }
}

async fn writer(target: AccessLog, mut rx: mpsc::Receiver<String>) {
    let mut out: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = match &target {
        AccessLog::File(p) => match tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .await
        {
            Ok(f) => Box::new(f),
            Err(e) => {
                tracing::error!(path = %p.display(), error = %e, "cannot open access log; logging to stdout");
                Box::new(tokio::io::stdout())
            }
        },
        _ => Box::new(tokio::io::stdout()),
    };
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Some(line) = rx.recv().await {
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        // Batch whatever else is already queued into one write.
        while buf.len() < 60 * 1024 {
            match rx.try_recv() {
                Ok(l) => {
                    buf.extend_from_slice(l.as_bytes());
                    buf.push(b'\n');
                }
                Err(_) => break,
            }
        }
        if out.write_all(&buf).await.is_err() || out.flush().await.is_err() {
            tracing::warn!("access log write failed");
        }
        buf.clear();
    }
}
