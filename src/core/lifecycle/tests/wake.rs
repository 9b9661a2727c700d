//! When the driver next needs its host (`Driver::next_wake`): each input moves it, the host's
//! delay is bounded (`wake_in_ms`), and a configuration going away gives back its leases.

use super::*;
use crate::cache::{self, WORKER_REFRESH_GRACE_MS};

/// A worker VM (no gauges) with a fresh 100 s token fetched at 10 ms.
fn worker_with_token(config: &Arc<Config>, store: &mut MemoryStore) -> Driver {
    let (mut vm, _) = Driver::new(Arc::clone(config), 3, 0, store);
    vm.set_serves_requests();
    let sent = sends(&vm.on_tick(10, store)).into_iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(sent.len(), 1, "no token: the worker fetches at once");
    let _ = vm.on_answer(sent[0], answer(b"200", &ok_body("tok", 100)), 60, store);
    vm
}

#[test]
fn a_fresh_token_wakes_its_vm_at_its_refresh_time_not_every_100_ms() {
    let config = config_with("");
    let mut store = MemoryStore::default();
    let mut vm = worker_with_token(&config, &mut store);
    let stored = entry(&store, &config);
    // Sent at 10 ms, 100 s: refresh at 80.01 s, usable until 95.01 s; a worker waits its grace.
    let grace = WORKER_REFRESH_GRACE_MS.min((stored.expires_at_ms - stored.refresh_at_ms) / 2);
    assert_eq!(vm.next_wake(), Some(stored.refresh_at_ms + grace), "{stored:?}");
    let _ = vm.on_tick(5_000, &mut store);
    assert_eq!(vm.next_wake(), Some(81_010), "a tick that changes nothing leaves it there");
    // The main-thread VM refreshes without the grace and sets its gauges every second.
    let (mut main, _) = Driver::new(Arc::clone(&config), 4, 100, &mut store);
    assert_eq!(main.next_wake(), Some(0), "gauges due at once on a new main-thread VM");
    let _ = main.on_tick(200, &mut store);
    assert_eq!(main.next_wake(), Some(1_200), "the next gauge report");
    main.set_serves_requests();
    assert_eq!(main.next_wake(), Some(stored.refresh_at_ms), "no gauges, no grace: the refresh time");
}

#[test]
fn a_fetch_in_flight_a_backoff_and_another_vms_lease_move_the_wake() {
    let config = config_with("");
    let mut store = MemoryStore::default();
    let (mut vm, _) = Driver::new(Arc::clone(&config), 3, 0, &mut store);
    vm.set_serves_requests();
    assert_eq!(vm.next_wake(), Some(0), "no token: due now");
    let sent = vm.on_tick(10, &mut store);
    let lease_until = entry(&store, &config).lease_until_ms;
    assert_eq!(vm.next_wake(), Some(lease_until), "a fetch in flight: its lease's end (a lost answer)");
    let (mut other, _) = Driver::new(Arc::clone(&config), 4, 20, &mut store);
    other.set_serves_requests();
    let _ = other.on_tick(30, &mut store);
    assert_eq!(other.next_wake(), Some(lease_until), "another VM's lease: when it runs out");
    let _ = vm.on_answer(sends(&sent)[0].id, answer(b"503", b""), 500, &mut store);
    let retry_at = entry(&store, &config).retry_at_ms;
    assert!(retry_at > 500, "backing off");
    assert_eq!(vm.next_wake(), Some(retry_at), "a backoff: when it ends");
    let _ = other.on_wake(&[], 510, &mut store);
    assert_eq!(other.next_wake(), Some(retry_at), "the broadcast wake brings the others the new time");
}

#[test]
fn a_paused_request_a_token_copy_and_a_superseded_key_move_the_wake() {
    // ahead_ratio 1: no refresh before expiry, so the copy's end comes first.
    let config = config_with(r#", "max_wait_ms": 3000, "refresh": {"ahead_ratio": 1.0}"#);
    let mut store = MemoryStore::default();
    let (mut vm, _) = Driver::new(Arc::clone(&config), 3, 0, &mut store);
    vm.set_serves_requests();
    let (outcome, _) = vm.on_request(0, 7, 100, &mut store);
    assert_eq!(outcome, RequestOutcome::Wait);
    let sent = vm.on_wake(&[0], 110, &mut store);
    assert_eq!(vm.next_wake(), Some(3_100), "the paused request's deadline, before the lease's end");
    let _ = vm.on_answer(sends(&sent)[0].id, answer(b"200", &ok_body("tok", 100)), 200, &mut store);
    let _ = vm.on_wake(&[], 210, &mut store);
    assert_eq!(vm.waiting(), 0);
    let stored = entry(&store, &config);
    let copy = vm.cached(0).map(|c| c.valid_until_ms);
    assert_eq!(copy, Some(stored.expires_at_ms - cache::VM_COPY_MARGIN_MS));
    assert_eq!(vm.next_wake(), copy, "the copy's end, before the refresh (at expiry)");
    let _ = vm.on_tick(stored.expires_at_ms - cache::VM_COPY_MARGIN_MS, &mut store);
    assert!(vm.cached(0).is_none(), "dropped at its end");
    assert_eq!(vm.next_wake(), Some(stored.expires_at_ms), "then the fetch at expiry");
    vm.set_superseded(vec![config.profiles[0].cache_key.clone()]);
    assert_eq!(vm.next_wake(), None, "a key a newer configuration owns: nothing timed here");
}

#[test]
fn a_tick_that_cannot_write_the_store_tries_again_after_100_ms_not_at_once() {
    struct Refusing(MemoryStore);
    impl Environment for Refusing {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            self.0.get(key)
        }
        fn set(&mut self, _: &str, _: &[u8], _: Option<u32>) -> Written {
            Written::Failed
        }
        fn random_u64(&mut self) -> u64 {
            1
        }
    }
    let config = config_with("");
    let mut store = MemoryStore::default();
    let (mut vm, _) = Driver::new(Arc::clone(&config), 3, 0, &mut store);
    vm.set_serves_requests();
    let mut refusing = Refusing(store);
    let _ = vm.on_tick(1_000, &mut refusing);
    assert_eq!(vm.next_wake(), Some(1_100));
}

#[test]
fn the_host_sleeps_until_the_wake_but_never_longer_than_the_ceiling() {
    assert_eq!(wake_in_ms(Some(1_250), 1_000), 250);
    assert_eq!(wake_in_ms(Some(900), 1_000), 1, "a time past: at once, never a period of 0");
    assert_eq!(wake_in_ms(Some(1_000), 1_000), 1);
    assert_eq!(wake_in_ms(Some(90_000), 1_000), MAX_WAKE_INTERVAL_MS, "the ceiling bounds a lost wake");
    assert_eq!(wake_in_ms(None, 1_000), MAX_WAKE_INTERVAL_MS);
}

#[test]
fn a_configuration_going_away_gives_back_the_lease_of_its_fetch_in_flight() {
    let config = config_with("");
    let mut store = MemoryStore::default();
    let (mut old, _) = Driver::new(Arc::clone(&config), 1, 0, &mut store);
    assert_eq!(sends(&old.on_tick(10, &mut store)).len(), 1);
    let (mut new, _) = Driver::new(Arc::clone(&config), 2, 20, &mut store);
    assert!(sends(&new.on_tick(30, &mut store)).is_empty(), "the old configuration's lease holds");
    let actions = old.on_shut_down(&mut store);
    assert!(actions.contains(&Action::BroadcastWake), "{actions:?}");
    assert_eq!(entry(&store, &config).lease_holder, 0);
    let _ = new.on_wake(&[], 40, &mut store);
    assert!(new.next_wake().is_some_and(|at| at <= 40), "the broadcast wake shows the fetch due now");
    assert_eq!(sends(&new.on_tick(41, &mut store)).len(), 1, "the newer configuration fetches at once");
    assert!(new.on_shut_down(&mut store).contains(&Action::BroadcastWake));
    let _ = new.on_shut_down(&mut store);
    assert!(old.on_shut_down(&mut store).is_empty(), "nothing in flight: nothing to give back");
}

#[test]
fn a_configuration_going_away_leaves_a_lease_it_no_longer_holds() {
    let config = config_with("");
    let mut store = MemoryStore::default();
    let (mut old, _) = Driver::new(Arc::clone(&config), 1, 0, &mut store);
    assert_eq!(sends(&old.on_tick(10, &mut store)).len(), 1);
    let lease_until = entry(&store, &config).lease_until_ms;
    let (mut new, _) = Driver::new(Arc::clone(&config), 2, lease_until, &mut store);
    assert_eq!(sends(&new.on_tick(lease_until, &mut store)).len(), 1, "a lease run out is taken over");
    assert!(old.on_shut_down(&mut store).is_empty());
    assert_eq!(entry(&store, &config).lease_holder, 2, "the new holder's lease stays");
}
