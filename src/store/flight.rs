//! Single-flight: concurrent requests for the same module wait for one resolution (one download) instead of
//! each downloading it (Istio's cache, `pkg/wasm/cache.go`, has none: concurrent misses each download). A
//! request is the same module as another when it names the same sha256, or the same OCI manifest digest,
//! or, without either, the same URL.
//!
//! Across the processes sharing the cache directory, the leader of a flight also takes the key's download
//! lock before it goes to the network ([`super::download_lock`]).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Instant;

use super::Store;
use crate::module::{Module, ModuleError};

#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) enum FlightKey {
    /// A module's own sha256.
    Sha(String),
    /// An OCI image's manifest digest: another namespace than module checksums.
    Manifest(String),
    Url(String),
}

/// How a flight ended, handed to everyone who waited for it.
#[derive(Clone)]
pub(super) struct Outcome {
    pub result: Result<Module, ModuleError>,
    /// A download happened (or was attempted): followers count their lookup as a miss.
    pub fetched: bool,
}

/// One in-progress resolution of a module that others may wait for.
pub(super) struct Flight {
    done: Mutex<Option<Outcome>>,
    cv: Condvar,
}

impl Flight {
    /// The flight's outcome, waiting for it until `deadline`; `None` if the deadline came first.
    pub fn wait(&self, deadline: Instant) -> Option<Outcome> {
        let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(outcome) = &*done {
                return Some(outcome.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            done = self.cv.wait_timeout(done, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

/// Joins the flight for `key` in `flights` (the store's, under its state lock), or starts one: then the
/// returned guard makes the caller its leader.
pub(super) fn join<'a>(
    store: &'a Store,
    flights: &mut HashMap<FlightKey, Arc<Flight>>,
    key: FlightKey,
) -> (Arc<Flight>, Option<FlightGuard<'a>>) {
    if let Some(f) = flights.get(&key) {
        return (f.clone(), None);
    }
    let flight = Arc::new(Flight { done: Mutex::new(None), cv: Condvar::new() });
    flights.insert(key.clone(), flight.clone());
    let guard = FlightGuard { store, key, flight: flight.clone(), published: false };
    (flight, Some(guard))
}

/// Makes sure a flight always completes, even if its leader panics: waiters get an error instead of hanging
/// and the key is free for the next attempt.
pub(super) struct FlightGuard<'a> {
    store: &'a Store,
    key: FlightKey,
    flight: Arc<Flight>,
    published: bool,
}

impl FlightGuard<'_> {
    pub fn publish(&mut self, outcome: Outcome) {
        self.published = true;
        self.store.state().flights.remove(&self.key);
        *self.flight.done.lock().unwrap_or_else(PoisonError::into_inner) = Some(outcome);
        self.flight.cv.notify_all();
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        if !self.published {
            self.publish(Outcome {
                result: Err(ModuleError {
                    counted_as: None,
                    message: "internal error while fetching the module".into(),
                }),
                fetched: true,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::metrics::FetchResult;
    use crate::module::ModuleRequest;
    use crate::store::files::sha256_hex;
    use crate::store::fixture::{fixture, lookups, req, req_sha, sixteen_at_once, wasm};

    #[test]
    fn single_flight_sixteen_threads_one_fetch() {
        let body = wasm("a");
        for r in [req("http://x/a.wasm"), req_sha("http://x/a.wasm", &sha256_hex(&body))] {
            let f = fixture();
            f.fetcher.serve("http://x/a.wasm", &body);
            f.fetcher.set_delay(Duration::from_millis(200));
            let results = sixteen_at_once(|| f.store().get(&r));
            assert_eq!(f.fetcher.calls(), 1);
            let first = results[0].clone().unwrap();
            assert!(results.iter().all(|r| r.as_ref() == Ok(&first)));
            assert_eq!(f.metrics.fetches(FetchResult::Success), 1);
            // Every waiter counts one miss; the leader of a checksum-less request counts two.
            let leader_lookups = if r.sha256.is_none() { 2 } else { 1 };
            assert_eq!(lookups(&f.metrics), (0, 15 + leader_lookups));
        }
    }

    #[test]
    fn single_flight_failure_is_shared() {
        let f = fixture();
        f.fetcher.set_delay(Duration::from_millis(100));
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8).map(|_| s.spawn(|| f.store().get(&req("http://x/missing")))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(|r| r.is_err()));
        assert!(f.fetcher.calls() < 8);
        assert_eq!(f.metrics.fetches(FetchResult::DownloadFailure) as usize, f.fetcher.calls());
    }

    #[test]
    fn waiter_gives_up_at_its_own_deadline() {
        let f = fixture();
        f.fetcher.serve("http://x/a.wasm", &wasm("a"));
        f.fetcher.set_delay(Duration::from_millis(400));
        std::thread::scope(|s| {
            let leader = s.spawn(|| f.store().get(&req("http://x/a.wasm")));
            while f.fetcher.calls() == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let short = ModuleRequest { timeout: Duration::from_millis(50), ..req("http://x/a.wasm") };
            let err = f.store().get(&short).unwrap_err();
            assert!(err.message.contains("timed out"), "{}", err.message);
            assert!(leader.join().unwrap().is_ok());
        });
    }
}
