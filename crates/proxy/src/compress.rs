//! A response body compressed on its way out (the `compress` filter chose the
//! coding and set the headers). The body streams through an async-compression encoder
//! in chunks of up to 8 KiB; trailers, if the upstream sent any, follow the compressed
//! data.
//!
//! Levels favour speed, as on-the-fly compression should: gzip 5, brotli 4, zstd 3.

use crate::body::{BoxError, Source};
use async_compression::Level;
use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder, ZstdEncoder};
use bytes::Bytes;
use futures_util::Stream;
use http::HeaderMap;
use http_body::{Body, Frame};
use meshgate_core::Coding;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::AsyncRead;
use tokio_util::io::{ReaderStream, StreamReader};

const CHUNK: usize = 8 * 1024;

pub struct Compressed {
    out: ReaderStream<Pin<Box<dyn AsyncRead + Send + Sync>>>,
    /// Trailers the source ended with, sent after the compressed data.
    trailers: Arc<Mutex<Option<HeaderMap>>>,
    done: bool,
}

impl Compressed {
    pub fn new(source: Source, coding: Coding) -> Self {
        let trailers = Arc::new(Mutex::new(None));
        let raw = StreamReader::new(Raw {
            source,
            trailers: trailers.clone(),
        });
        let reader: Pin<Box<dyn AsyncRead + Send + Sync>> = match coding {
            Coding::Gzip => Box::pin(GzipEncoder::with_quality(raw, Level::Precise(5))),
            Coding::Brotli => Box::pin(BrotliEncoder::with_quality(raw, Level::Precise(4))),
            Coding::Zstd => Box::pin(ZstdEncoder::with_quality(raw, Level::Default)),
        };
        Self {
            out: ReaderStream::with_capacity(reader, CHUNK),
            trailers,
            done: false,
        }
    }
}

impl Body for Compressed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.out).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(data))) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                self.done = true;
                let trailers = self
                    .trailers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// The source body's data as a stream for the encoder; its tap sees each chunk.
struct Raw {
    source: Source,
    trailers: Arc<Mutex<Option<HeaderMap>>>,
}

impl Stream for Raw {
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let frame = match self.source.poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    if let Some(t) = self.source.tap.take() {
                        t.end();
                    }
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => {
                    self.source.tap = None;
                    return Poll::Ready(Some(Err(std::io::Error::other(e))));
                }
                Poll::Ready(Some(Ok(f))) => f,
            };
            match frame.into_data() {
                Ok(data) => {
                    if let Some(t) = &mut self.source.tap
                        && !t.data(&data)
                    {
                        self.source.tap = None;
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                Err(frame) => {
                    // A body with trailers is not stored by a tap.
                    self.source.tap = None;
                    if let Ok(t) = frame.into_trailers() {
                        *self.trailers.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
                    }
                }
            }
        }
    }
}
