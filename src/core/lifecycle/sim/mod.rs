//! A deterministic simulation of the whole token lifecycle: 1–32 simulated VMs
//! over one shared store with Envoy's compare-and-swap semantics and a simulated clock, driven by
//! seeded random interleavings of requests, ticks, wakes, kicks, IdP answers of every class,
//! undeliverable callouts, reconfigurations and VM restarts. Invariants are checked after every
//! step (see `world.rs`); a failing seed prints its step list and replays with `SIM_SEED=<seed>`.
//!
//! Native only: `make test` runs `SIM_SCHEDULES` (default 10,000) schedules, `make simulate` a
//! million in release mode. Under wasm32 (`make unit-wasm`) a short run of 100 schedules.
//!
//! About 30 % of schedules make profile p a token exchange (RFC 8693): requests of up to 40
//! subjects, some with a JWS subject token that expires during the run, a per-subject cache small
//! enough to evict, and tight exchange limits; the checks add invariant 7 (`world.rs`).
//!
//! What the model assumes, as the code does: a VM's tick comes when its driver's `next_wake` says
//! (never more than `MAX_WAKE_INTERVAL_MS` apart) and is at most 900 ms late
//! (`cache::VM_COPY_MARGIN_MS` covers that lateness); the IdP's clock is the proxy's; Envoy always
//! ends a callout (an answer or its timeout reply) unless the VM is gone.

mod idp;
mod world;

use world::{Params, World};

/// splitmix64: small, deterministic, good enough to pick schedules.
pub(super) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// Uniform in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// True with `percent` % probability.
    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// True with `per_mille` ‰ probability.
    pub(crate) fn chance_per_mille(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// The seed of schedule `index`.
fn seed_of(index: u64) -> u64 {
    Rng::new(index ^ 0x5eed).next()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Runs one schedule; `Err` carries the violated invariant and, when traced, the step list.
fn run(seed: u64, trace: bool) -> Result<world::Stats, String> {
    let mut rng = Rng::new(seed);
    let params = Params::random(&mut rng);
    let mut world = World::new(seed, rng, params, trace);
    world.run();
    match world.violation.take() {
        None => Ok(world.stats),
        Some(violation) => {
            let steps = world.trace.take().unwrap_or_default();
            Err(format!("{violation}\nparameters: {:?}\nsteps:\n{}", world.params, steps.join("\n")))
        }
    }
}

/// Runs a schedule; on a violation, replays it with the trace on and panics with the report.
fn check_seed(seed: u64) -> world::Stats {
    match run(seed, false) {
        Ok(stats) => stats,
        Err(_) => {
            let report = run(seed, true).err().unwrap_or_else(|| "did not replay: nondeterminism".into());
            let limit = if std::env::var("SIM_SEED").is_ok() { usize::MAX } else { 400 };
            let lines: Vec<&str> = report.lines().collect();
            let shown = if lines.len() > limit {
                format!(
                    "{}\n... ({} more steps; SIM_SEED shows all)\n{}",
                    lines[..4].join("\n"),
                    lines.len() - limit,
                    lines[lines.len() - limit + 4..].join("\n")
                )
            } else {
                report.clone()
            };
            panic!(
                "simulation seed {seed} violated an invariant: {shown}\nreplay: SIM_SEED={seed} cargo test --lib lifecycle::sim -- --nocapture"
            );
        }
    }
}

#[test]
fn simulated_lifecycle_keeps_every_invariant() {
    if let Some(seed) = env_u64("SIM_SEED") {
        let stats = check_seed(seed);
        eprintln!("seed {seed}: {stats:?}");
        return;
    }
    let wasm = cfg!(target_arch = "wasm32");
    let schedules = env_u64("SIM_SCHEDULES").unwrap_or(if wasm { 100 } else { 10_000 });
    // Schedules are independent: shard them over threads (SIM_THREADS, default 2).
    let threads = if wasm { 1 } else { env_u64("SIM_THREADS").unwrap_or(2).clamp(1, 64) };
    let started = std::time::Instant::now();
    let shard = |shard: u64| {
        let mut total = world::Stats::default();
        let mut index = shard;
        while index < schedules {
            total.add(&check_seed(seed_of(index)));
            index += threads;
        }
        total
    };
    // WASI has no threads: one shard runs inline.
    let shards: Vec<world::Stats> = if threads == 1 {
        vec![shard(0)]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads).map(|index| scope.spawn(move || shard(index))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
        })
    };
    let mut total = world::Stats::default();
    shards.iter().for_each(|shard| total.add(shard));
    eprintln!("{schedules} schedules in {:.1} s on {threads} threads: {total:?}", started.elapsed().as_secs_f64());
    // The simulation must reach the paths it claims to check.
    let reached = total.served > 0
        && total.resumed > 0
        && total.takeovers > 0
        && total.budget_refusals > 0
        && total.restarts > 0
        && total.lost_requests > 0
        && total.exchanges > 0
        && total.subject_served > 0;
    assert!(schedules < 1_000 || reached, "{total:?}");
}
