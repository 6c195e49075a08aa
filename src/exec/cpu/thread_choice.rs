//! Whether a pass runs on the whole thread pool or on one thread, chosen by how long
//! each way has recently taken.
//!
//! A pass is a chain of parallel loops, each ending when its slowest thread does. On a
//! machine whose cores are shared with other work (a VM whose second vCPU the host lends
//! elsewhere for milliseconds at a time), a thread that stalls while it holds a share of
//! a loop holds up the whole loop, and that happens in nearly every loop of a pass. On
//! this project's 2-vCPU VM, in such stretches, a pass on two threads took about twice
//! as long as on one (ResNet-50 dense at batch 1: 184–198 ms on two, 88–106 on one;
//! MobileNetV2 26–32 against 12–16), where ONNX Runtime lost 1.15–1.35× going from one
//! thread to two.
//!
//! So each kind of pass (batch size and policy) keeps the recent time of the way it runs.
//! Its 33rd pass runs on one thread, once ([`FIRST_PROBE`]). After that, while passes
//! run on the pool and its time stays near the best it has seen, nothing else happens: a
//! quiet machine pays that one pass. Once the pool's time has grown past
//! [`SUSPECT`] × its best, every [`PROBE_EVERY`] passes one runs on one thread; if that
//! was faster by [`MARGIN`], passes stay on one thread, and every [`PROBE_EVERY`] passes
//! one tries the pool again, going back to it when it is the faster again. A probe that
//! finds the pool still faster takes the pool's present time as its new best: the whole
//! machine slowed down, not the second thread.
//!
//! Both ways compute the same layers with the same kernels; a pass's values do not
//! depend on the way, except for gated batches of ResNet-50-like models, whose logits
//! moved by at most 1e-6 between one thread and two (rounding in what the threads sum).
//!
//! ```
//! use dynsparse::exec::cpu::thread_choice::{ThreadChoice, Way};
//! let choice = ThreadChoice::default();
//! // A quiet machine: one pass tries one thread, which takes 18 ms, and the pool stays.
//! let mut ones = 0;
//! for _ in 0..40 {
//!     let way = choice.choose(1);
//!     ones += usize::from(way == Way::One);
//!     choice.record(1, way, if way == Way::One { 18.0 } else { 10.0 });
//! }
//! assert_eq!(ones, 1);
//! // The pool slows to 25 ms a pass: one pass soon tries one thread, which takes 12.
//! let mut probed = false;
//! for _ in 0..40 {
//!     let way = choice.choose(1);
//!     probed |= way == Way::One;
//!     choice.record(1, way, if way == Way::One { 12.0 } else { 25.0 });
//! }
//! assert!(probed);
//! // One thread was faster: passes now run there (but for a probe of the pool now and then).
//! assert_eq!(choice.choose(1), Way::One);
//! ```

use std::sync::Mutex;

/// Where a pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// On the pool it was called from, every thread.
    Pool,
    /// On one thread.
    One,
}

/// How far the pool's recent time may grow past its best before one thread is tried.
pub const SUSPECT: f64 = 1.4;

/// How much faster the other way must have been for passes to move to it.
pub const MARGIN: f64 = 1.1;

/// Passes between two probes of the way not taken.
pub const PROBE_EVERY: u32 = 16;

/// Passes on the pool before the first probe of one thread, which every kind of pass
/// makes once: a machine already crowded when the first passes ran gives the pool a
/// best time that is already slow, and the pool would then never look slow enough.
/// Late enough that a short run (a demo's ten batches, a command's few images) never
/// pays it, and a long one pays one pass in many.
pub const FIRST_PROBE: u32 = 32;

/// Kinds of pass remembered at most.
const MAX_KINDS: usize = 64;

/// Weight of the newest time in a way's running mean.
const NEWEST: f64 = 0.25;

/// One kind of pass.
#[derive(Debug, Clone, Copy)]
struct Record {
    /// The way passes run, probes aside.
    current: Way,
    /// Running means of each way's times (ms), once measured.
    pool: Option<f64>,
    one: Option<f64>,
    /// The lowest the pool's running mean has been.
    best_pool: f64,
    /// Passes the current way ran since the last probe.
    since_probe: u32,
    /// Whether one thread has been tried.
    tried_one: bool,
}

impl Record {
    fn new() -> Self {
        Record {
            current: Way::Pool,
            pool: None,
            one: None,
            best_pool: f64::INFINITY,
            since_probe: 0,
            tried_one: false,
        }
    }

    fn choose(&self) -> Way {
        let due = self.since_probe >= PROBE_EVERY;
        match self.current {
            Way::Pool if !self.tried_one && self.since_probe >= FIRST_PROBE => Way::One,
            Way::Pool => match self.pool {
                Some(t) if due && t > SUSPECT * self.best_pool => Way::One,
                _ => Way::Pool,
            },
            Way::One if due => Way::Pool,
            Way::One => Way::One,
        }
    }

    fn record(&mut self, way: Way, ms: f64) {
        let mean = |m: Option<f64>| Some(m.map_or(ms, |m| (1.0 - NEWEST) * m + NEWEST * ms));
        match (self.current, way) {
            (Way::Pool, Way::Pool) => {
                self.pool = mean(self.pool);
                self.best_pool = self.best_pool.min(self.pool.unwrap_or(ms));
                self.since_probe += 1;
            }
            (Way::One, Way::One) => {
                self.one = mean(self.one);
                self.since_probe += 1;
            }
            // A probe of one thread.
            (Way::Pool, Way::One) => {
                self.since_probe = 0;
                self.tried_one = true;
                self.one = Some(ms);
                let pool = self.pool.unwrap_or(f64::INFINITY);
                if ms * MARGIN < pool {
                    self.current = Way::One;
                } else {
                    self.best_pool = pool;
                }
            }
            // A probe of the pool.
            (Way::One, Way::Pool) => {
                self.since_probe = 0;
                self.pool = Some(ms);
                if ms * MARGIN < self.one.unwrap_or(f64::INFINITY) {
                    self.current = Way::Pool;
                    self.best_pool = self.best_pool.min(ms);
                }
            }
        }
    }
}

/// The way each kind of pass runs, keyed by a number the caller derives from the batch
/// size and the policy. Shared by concurrent passes; a heuristic, so two passes
/// choosing at once may both probe.
#[derive(Debug, Default)]
pub struct ThreadChoice {
    records: Mutex<Vec<(u64, Record)>>,
}

impl ThreadChoice {
    /// The way the next pass of kind `key` runs.
    pub fn choose(&self, key: u64) -> Way {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(Way::Pool, |(_, r)| r.choose())
    }

    /// Notes that a pass of kind `key` ran `way` in `ms` milliseconds.
    pub fn record(&self, key: u64, way: Way, ms: f64) {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let at = match records.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                // A caller cycling through many batch sizes or thresholds keeps the
                // newest kinds only.
                if records.len() >= MAX_KINDS {
                    records.remove(0);
                }
                records.push((key, Record::new()));
                records.len() - 1
            }
        };
        records[at].1.record(way, ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `passes` passes of kind 0, each taking `pool` or `one` ms by its way;
    /// returns how many ran on one thread.
    fn drive(c: &ThreadChoice, passes: usize, pool: f64, one: f64) -> usize {
        let mut ones = 0;
        for _ in 0..passes {
            let way = c.choose(0);
            ones += usize::from(way == Way::One);
            c.record(0, way, if way == Way::One { one } else { pool });
        }
        ones
    }

    #[test]
    fn a_quiet_machine_tries_one_thread_once() {
        let c = ThreadChoice::default();
        // Times that wander within the suspect band around the best; one thread twice
        // as slow.
        let mut ones = Vec::new();
        for i in 0..500 {
            let way = c.choose(0);
            if way == Way::One {
                ones.push(i);
            }
            c.record(
                0,
                way,
                (10.0 + (i % 7) as f64 * 0.5) * if way == Way::One { 2.0 } else { 1.0 },
            );
        }
        assert_eq!(ones, vec![FIRST_PROBE as usize]);
    }

    /// A machine crowded from the first pass: the pool's best is slow already, and the
    /// first probe finds one thread faster.
    #[test]
    fn a_machine_crowded_from_the_start_moves_to_one_thread() {
        let c = ThreadChoice::default();
        let ones = drive(&c, 232, 25.0, 15.0);
        assert!(ones > 180, "{ones} of 232 on one thread");
        assert_eq!(c.choose(0), Way::One);
    }

    #[test]
    fn a_stalled_second_thread_moves_passes_to_one_and_back() {
        let c = ThreadChoice::default();
        assert_eq!(drive(&c, 50, 10.0, 18.0), 1);
        // The pool now takes 25 ms, one thread 18: after a probe nearly all run on one.
        let ones = drive(&c, 200, 25.0, 18.0);
        assert!(ones > 150, "{ones} of 200 on one thread");
        assert_eq!(c.choose(0), Way::One);
        // The pool recovers: within a probe's interval passes are back on it.
        let ones = drive(&c, 2 * PROBE_EVERY as usize + 2, 10.0, 18.0);
        assert!(ones <= PROBE_EVERY as usize + 1, "{ones}");
        assert_eq!(drive(&c, 100, 10.0, 18.0), 0);
    }

    #[test]
    fn a_machine_slower_as_a_whole_keeps_the_pool_after_one_probe() {
        let c = ThreadChoice::default();
        assert_eq!(drive(&c, 50, 10.0, 18.0), 1);
        // Both ways twice as slow: one probe finds the pool still faster, and its new
        // time becomes the best, so no further probes follow.
        let ones = drive(&c, 300, 20.0, 36.0);
        assert_eq!(ones, 1);
        assert_eq!(c.choose(0), Way::Pool);
    }

    #[test]
    fn only_the_newest_kinds_are_kept() {
        let c = ThreadChoice::default();
        for key in 0..(MAX_KINDS as u64 + 10) {
            c.record(key, Way::Pool, 1.0);
        }
        let records = c.records.lock().unwrap();
        assert_eq!(records.len(), MAX_KINDS);
        assert_eq!(records[0].0, 10);
        assert_eq!(records[MAX_KINDS - 1].0, MAX_KINDS as u64 + 9);
    }

    #[test]
    fn kinds_of_pass_choose_apart() {
        let c = ThreadChoice::default();
        for _ in 0..40 {
            for key in [1, 2] {
                let way = c.choose(key);
                c.record(key, way, if way == Way::One { 18.0 } else { 10.0 });
            }
        }
        for _ in 0..40 {
            let way = c.choose(1);
            c.record(1, way, if way == Way::One { 12.0 } else { 30.0 });
            let way = c.choose(2);
            c.record(2, way, if way == Way::One { 18.0 } else { 10.0 });
        }
        assert_eq!(c.choose(1), Way::One);
        assert_eq!(c.choose(2), Way::Pool);
    }
}
