//! The synchronisation the native host's threads share: the standard library's, or shuttle's
//! under the `model-check` feature, whose scheduler then chooses every interleaving point
//! (`model_check.rs`). The process-wide token store is a leaf lock (nothing is taken under it) and
//! stays on the standard library's.

#[cfg(not(feature = "model-check"))]
pub use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(feature = "model-check"))]
pub use std::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(feature = "model-check"))]
pub use std::thread;

#[cfg(feature = "model-check")]
pub use shuttle::sync::atomic::{AtomicU64, Ordering};
#[cfg(feature = "model-check")]
pub use shuttle::sync::{Condvar, Mutex, MutexGuard};
#[cfg(feature = "model-check")]
pub use shuttle::thread;

/// Locks `mutex`. Nothing that panics runs under the host's locks; if something did, the data
/// is still consistent, so the lock is taken back rather than failing forever.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits on `signal` for at most `period` (the tick thread's sleep); `guard` is `mutex`'s. True
/// when the period ran out, false when signalled. Shuttle's condition variable never times out,
/// so under the model check a period ends with a yield (the scheduler picks when),
/// [`model_ticks`] times per execution; after that the thread waits for a signal only (an
/// earlier wake or its stop), so a deadlock or a lost signal leaves no thread runnable and is
/// reported.
pub fn wait_until<'a, T>(
    mutex: &'a Mutex<T>,
    signal: &Condvar,
    guard: MutexGuard<'a, T>,
    period: std::time::Duration,
) -> (MutexGuard<'a, T>, bool) {
    #[cfg(not(feature = "model-check"))]
    {
        let _ = mutex;
        match signal.wait_timeout(guard, period) {
            Ok((guard, timeout)) => (guard, timeout.timed_out()),
            Err(poisoned) => {
                let (guard, timeout) = poisoned.into_inner();
                (guard, timeout.timed_out())
            }
        }
    }
    #[cfg(feature = "model-check")]
    {
        let _ = period;
        let ticks =
            TICKS_LEFT.fetch_update(std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed, |n| {
                n.checked_sub(1)
            });
        if ticks.is_err() {
            return (signal.wait(guard).unwrap_or_else(|poisoned| poisoned.into_inner()), false);
        }
        drop(guard);
        thread::yield_now();
        (lock(mutex), true)
    }
}

#[cfg(feature = "model-check")]
static TICKS_LEFT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// How many tick periods may end in the current model-check execution.
#[cfg(all(test, feature = "model-check"))]
pub fn model_ticks(ticks: u32) {
    TICKS_LEFT.store(ticks, std::sync::atomic::Ordering::Relaxed);
}
