//! The exchange limits of one profile, per Envoy process, kept in one store key next to its sets:
//! a token bucket (exchanges per second, burst) and the permits of the exchanges in flight.
//!
//! Every exchange takes a permit before it claims its subject's lease and gives it back when its
//! answer is recorded. A permit carries the lease deadline of its exchange, so a permit whose holder
//! died frees itself: nothing leaks. Encoding (little-endian): version (1), milli-tokens (8),
//! refilled at ms (8), permit count (1), then per permit holder (8) and deadline ms (8).

use crate::config::ExchangeLimits;

const VERSION: u8 = 1;
const MILLI: u64 = 1_000;

/// One exchange in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Permit {
    pub(crate) holder: u64,
    pub(crate) until_ms: u64,
}

/// The limiter's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Limiter {
    milli_tokens: u64,
    refilled_at_ms: u64,
    permits: Vec<Permit>,
}

/// Why the limiter refused an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `exchanges_per_second` (and the burst) spent.
    Rate,
    /// `max_in_flight` exchanges await their answers.
    InFlight,
}

impl Limiter {
    /// The state in `bytes`; missing or unreadable bytes are a full bucket and no permit.
    pub(crate) fn decode(bytes: Option<&[u8]>, limits: &ExchangeLimits, now_ms: u64) -> Limiter {
        bytes.and_then(decode).unwrap_or(Limiter {
            milli_tokens: u64::from(limits.burst) * MILLI,
            refilled_at_ms: now_ms,
            permits: Vec::new(),
        })
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(18 + 16 * self.permits.len());
        out.push(VERSION);
        out.extend_from_slice(&self.milli_tokens.to_le_bytes());
        out.extend_from_slice(&self.refilled_at_ms.to_le_bytes());
        out.push(u8::try_from(self.permits.len()).unwrap_or(u8::MAX));
        for permit in self.permits.iter().take(usize::from(u8::MAX)) {
            out.extend_from_slice(&permit.holder.to_le_bytes());
            out.extend_from_slice(&permit.until_ms.to_le_bytes());
        }
        out
    }

    /// Exchanges in flight now (permits whose deadline has not passed).
    #[cfg(test)]
    pub(crate) fn in_flight(&self, now_ms: u64) -> usize {
        self.permits.iter().filter(|p| now_ms < p.until_ms).count()
    }

    /// Takes a permit for an exchange by `holder` whose lease lasts until `until_ms`, or says why not.
    pub(crate) fn acquire(
        &mut self,
        limits: &ExchangeLimits,
        holder: u64,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<(), Refused> {
        self.permits.retain(|p| now_ms < p.until_ms);
        let elapsed = now_ms.saturating_sub(self.refilled_at_ms);
        // per_second tokens a second is per_second milli-tokens a millisecond.
        let refill = elapsed.saturating_mul(u64::from(limits.per_second));
        self.milli_tokens = self.milli_tokens.saturating_add(refill).min(u64::from(limits.burst) * MILLI);
        self.refilled_at_ms = self.refilled_at_ms.max(now_ms);
        if self.permits.len() >= limits.max_in_flight as usize {
            return Err(Refused::InFlight);
        }
        if self.milli_tokens < MILLI {
            return Err(Refused::Rate);
        }
        self.milli_tokens -= MILLI;
        self.permits.push(Permit { holder, until_ms });
        Ok(())
    }

    /// Gives back the permit of `holder`'s exchange with deadline `until_ms`; `false` if there is
    /// none (it ran out, and was dropped).
    pub(crate) fn release(&mut self, holder: u64, until_ms: u64) -> bool {
        match self.permits.iter().position(|p| p.holder == holder && p.until_ms == until_ms) {
            Some(index) => {
                self.permits.swap_remove(index);
                true
            }
            None => false,
        }
    }
}

fn decode(bytes: &[u8]) -> Option<Limiter> {
    let (&version, rest) = bytes.split_first()?;
    if version != VERSION {
        return None;
    }
    let (tokens, rest) = rest.split_first_chunk::<8>()?;
    let (refilled, rest) = rest.split_first_chunk::<8>()?;
    let (&count, mut rest) = rest.split_first()?;
    let mut permits = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let (holder, tail) = rest.split_first_chunk::<8>()?;
        let (until, tail) = tail.split_first_chunk::<8>()?;
        permits.push(Permit { holder: u64::from_le_bytes(*holder), until_ms: u64::from_le_bytes(*until) });
        rest = tail;
    }
    rest.is_empty().then_some(Limiter {
        milli_tokens: u64::from_le_bytes(*tokens),
        refilled_at_ms: u64::from_le_bytes(*refilled),
        permits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ExchangeLimits = ExchangeLimits { per_second: 10, burst: 3, max_in_flight: 2 };

    fn round_trip(limiter: &Limiter) -> Limiter {
        Limiter::decode(Some(&limiter.encode()), &LIMITS, 0)
    }

    #[test]
    fn the_burst_then_the_rate() {
        let mut limiter = Limiter::decode(None, &LIMITS, 1_000);
        let roomy = ExchangeLimits { max_in_flight: 100, ..LIMITS };
        for n in 0..3 {
            assert_eq!(limiter.acquire(&roomy, 1, 1_000, 1_000 + n), Ok(()), "burst {n}");
            limiter = round_trip(&limiter);
        }
        assert_eq!(limiter.acquire(&roomy, 1, 1_000, 2_000), Err(Refused::Rate));
        assert_eq!(limiter.acquire(&roomy, 1, 1_099, 2_000), Err(Refused::Rate), "0.99 of a token");
        assert_eq!(limiter.acquire(&roomy, 1, 1_100, 2_000), Ok(()), "10/s: one token per 100 ms");
        assert_eq!(limiter.acquire(&roomy, 1, 1_150, 2_000), Err(Refused::Rate));
        // A long quiet spell refills only up to the burst.
        let granted = (0..10).filter(|n| limiter.acquire(&roomy, 1, 100_000, 200_000 + n).is_ok()).count();
        assert_eq!(granted, 3);
    }

    #[test]
    fn in_flight_permits_are_given_back_or_run_out() {
        let mut limiter = Limiter::decode(None, &LIMITS, 0);
        assert_eq!(limiter.acquire(&LIMITS, 1, 0, 5_000), Ok(()));
        assert_eq!(limiter.acquire(&LIMITS, 2, 0, 6_000), Ok(()));
        assert_eq!(limiter.in_flight(0), 2);
        assert_eq!(limiter.acquire(&LIMITS, 3, 1_000, 7_000), Err(Refused::InFlight));
        assert!(limiter.release(1, 5_000));
        assert!(!limiter.release(1, 5_000), "given back once");
        assert_eq!(limiter.acquire(&LIMITS, 3, 1_000, 7_000), Ok(()));
        // Holder 2 died: its permit frees itself at its deadline.
        assert_eq!(limiter.acquire(&LIMITS, 4, 5_999, 9_000), Err(Refused::InFlight));
        assert_eq!(limiter.acquire(&LIMITS, 4, 6_000, 9_000), Ok(()));
        assert_eq!(round_trip(&limiter), limiter);
    }

    #[test]
    fn unreadable_bytes_are_a_fresh_limiter() {
        let fresh = Limiter::decode(None, &LIMITS, 5);
        assert_eq!(Limiter::decode(Some(b"\x09garbage"), &LIMITS, 5), fresh);
        let bytes = fresh.encode();
        for cut in 0..bytes.len() {
            assert_eq!(Limiter::decode(Some(&bytes[..cut]), &LIMITS, 5), fresh);
        }
    }
}
