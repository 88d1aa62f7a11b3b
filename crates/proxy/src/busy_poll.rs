//! Busy polling: a one-worker proxy that has just sent something keeps polling its
//! sockets for a short while instead of sleeping, so the answer that usually follows
//! within microseconds is read at once rather than after the kernel wakes the thread
//! again. Opt-in (`MESHGATE_BUSY_POLL_US`); ADR 0008 has the measurements.
//!
//! How: the runtime's `on_thread_park` hook runs just before the worker would block
//! in `epoll_wait`. While the last activity (`active`) is younger than the budget,
//! the hook wakes a task that does nothing ([`Spinner`]); with a task queued the
//! runtime polls the driver with a zero timeout instead of blocking, runs the task,
//! and comes back to the hook. Once the budget has passed with nothing sent, the
//! worker sleeps as usual, so an idle proxy costs nothing.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

thread_local! {
    /// Bumped on every send that expects an answer.
    static ACTIVITY: Cell<u64> = const { Cell::new(0) };
    /// `ACTIVITY` as the park hook last saw it, and when it saw it change.
    static SEEN: Cell<(u64, Option<Instant>)> = const { Cell::new((0, None)) };
    static SPINNER: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

/// Mark that this thread sent something an answer will soon follow (a request
/// upstream, a response to a keep-alive client). One thread-local add.
#[inline]
pub(crate) fn active() {
    ACTIVITY.with(|a| a.set(a.get().wrapping_add(1)));
}

/// `active()` when a write sent bytes; passes the write's result on.
pub(crate) fn sent(written: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
    if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
        active();
    }
    written
}

/// The `on_thread_park` hook for a runtime that busy-polls for `budget` after the
/// last activity.
pub fn park_hook(budget: Duration) -> impl Fn() + Send + Sync + 'static {
    move || {
        let now = Instant::now();
        let activity = ACTIVITY.with(Cell::get);
        let (seen, since) = SEEN.with(Cell::get);
        let since = if seen == activity {
            since
        } else {
            SEEN.with(|s| s.set((activity, Some(now))));
            Some(now)
        };
        if since.is_some_and(|t| now.saturating_duration_since(t) < budget) {
            SPINNER.with(|s| {
                if let Some(w) = s.borrow().as_ref() {
                    w.wake_by_ref();
                }
            });
        }
    }
}

/// The task the park hook wakes to keep the worker polling. Spawn it once on the
/// runtime whose park hook is [`park_hook`]; it never finishes.
pub struct Spinner;

impl Future for Spinner {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        SPINNER.with(|s| {
            let mut s = s.borrow_mut();
            if !s.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *s = Some(cx.waker().clone());
            }
        });
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// How often the worker parks while a task sleeps for `ms`: many times when it
    /// busy-polls (every poll ends in the hook), a few when it blocks.
    async fn parks_during(parks: &AtomicUsize, ms: u64) -> usize {
        let before = parks.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        parks.load(Ordering::Relaxed) - before
    }

    #[test]
    fn polls_without_sleeping_only_within_the_budget_after_activity() -> std::io::Result<()> {
        let parks = Arc::new(AtomicUsize::new(0));
        let hook = park_hook(Duration::from_millis(40));
        let counted = parks.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .on_thread_park(move || {
                counted.fetch_add(1, Ordering::Relaxed);
                hook();
            })
            .build()?;
        rt.block_on(async {
            tokio::spawn(Spinner);
            let idle = parks_during(&parks, 20).await;
            active();
            let busy = parks_during(&parks, 20).await;
            // The rest of the budget, then well past it.
            tokio::time::sleep(Duration::from_millis(60)).await;
            let after = parks_during(&parks, 20).await;
            assert!(
                idle <= 5,
                "parked {idle} times with nothing sent: it polled"
            );
            assert!(
                busy >= 50,
                "parked only {busy} times within the budget: it slept"
            );
            assert!(
                after <= 5,
                "parked {after} times after the budget: it kept polling"
            );
        });
        Ok(())
    }
}
