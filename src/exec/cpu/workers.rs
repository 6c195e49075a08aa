//! Keeps the thread pool's other workers awake through a forward pass.
//!
//! A rayon worker that finds no work for a while goes to sleep, and the next parallel
//! loop wakes it through the kernel. A pass is a chain of parallel loops with serial code
//! between them (buffers, gates, planning), and at batch 1 most loops are short, so the
//! second worker slept and was woken again for nearly every layer: MobileNetV2 at batch
//! 1 spent about 8% of its samples in the kernel's scheduler (28 context switches per
//! pass) on a 2-core VM. Instead, for the length of a pass, each other worker runs a
//! loop that takes whatever work the pool has (`rayon::yield_now`) and spins when there
//! is none, so a loop's jobs are picked up at once.
//!
//! After a pass the workers may linger, spinning for a while in case another pass
//! comes: on a VM a vCPU whose thread sleeps is soon lent elsewhere, and a pass that
//! comes some milliseconds later ran as if on one thread or slower (MobileNetV2 at batch
//! 1, one pass every 30 ms on the 2-vCPU Zen 5 VM: 7.6 ms a pass against 1.9 back to
//! back; 4.0 once the engine's thread choice moved it to one thread).
//!
//! [`for_each_share`] splits a layer's work into one fixed share per thread.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Whether some pass in this process has the workers spinning for it. A precaution for
/// concurrent passes: a thread waiting for a job runs whatever it can steal, which may be
/// another pass's spinning loop, and that only returns when the other pass ends. Two
/// passes whose threads each held the other's loop would never end; that was not seen
/// (nor shown impossible beyond two threads), and one pass at a time rules it out.
static CLAIMED: AtomicBool = AtomicBool::new(false);

/// Passes begun in this process with the workers: a lingering worker stops when this
/// moves, so that it takes the new pass's work at once.
static PASSES: AtomicUsize = AtomicUsize::new(0);

/// Sets its flag when dropped, on the way out of a pass that returned or panicked (a
/// spinning loop left waiting for a panicked pass would never end).
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Clears the claim when dropped.
struct Release;

impl Drop for Release {
    fn drop(&mut self) {
        CLAIMED.store(false, Ordering::Release);
    }
}

/// The workers for one pass, unless another pass has them.
fn claim() -> Option<Release> {
    CLAIMED
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_ok()
        .then_some(Release)
}

/// Runs `pass` on a worker of the current pool while the pool's other workers wait for
/// its work spinning instead of sleeping. Called from outside any pool, it moves `pass`
/// into the global pool first (once, rather than each of its parallel loops waking
/// workers from outside). With one thread, or while another pass holds the workers, it
/// just runs `pass`.
///
/// With a nonzero `linger`, once `pass` is done the other workers go on spinning (and
/// running whatever the pool is given) until `linger` has passed or another pass begins;
/// the call returns at once.
///
/// No deadlock within a pass: the spinning loops are queued before `pass` runs, at the
/// old end of this thread's queue, the end other workers steal from. A worker takes one
/// before it can take any job of `pass`, so this thread never waits for a job of `pass`
/// with a spinning loop still queued behind it; one it runs itself at the end (never
/// stolen) finds the pass done and returns.
pub fn with_workers_awake<R: Send>(linger: Duration, pass: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_none() {
        return rayon::scope(|_| with_workers_awake(linger, pass));
    }
    // Every pass stops workers lingering after an earlier one, in any pool: they would
    // take a core from this one.
    let generation = PASSES.fetch_add(1, Ordering::AcqRel) + 1;
    let threads = rayon::current_num_threads();
    if threads < 2 {
        return pass();
    }
    let Some(_release) = claim() else {
        return pass();
    };
    let done = AtomicBool::new(false);
    let out = rayon::scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| {
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        for _ in 0..16 {
                            std::hint::spin_loop();
                        }
                    }
                }
            });
        }
        let _done = SetOnDrop(&done);
        pass()
    });
    if !linger.is_zero() {
        let until = Instant::now() + linger;
        // Queued on this thread, where the other workers, just done spinning for the
        // pass, steal them; this thread returns to its caller. (Called from outside the
        // pool, the caller's thread is not a worker: lingering on every worker then read
        // the same as on all but one, 2.6–4.5 ms against 2.8–4.6, within the noise.)
        for _ in 1..threads {
            rayon::spawn(move || linger_while(&PASSES, generation, until));
        }
    }
    out
}

/// Has workers lingering after a pass stop (they return within a round of spinning).
pub fn stop_lingering() {
    PASSES.fetch_add(1, Ordering::AcqRel);
}

/// Spins, running whatever the pool has, while `passes` still reads `generation` and
/// `until` is ahead.
fn linger_while(passes: &AtomicUsize, generation: usize, until: Instant) {
    #[cfg(test)]
    let _counted = tests::Lingering::new();
    let mut spins = 0u32;
    while passes.load(Ordering::Acquire) == generation {
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            for _ in 0..16 {
                std::hint::spin_loop();
            }
        }
        // The clock every 64 rounds: reading it costs more than a round of spinning.
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(64) && Instant::now() >= until {
            return;
        }
    }
}

/// Runs `share(i, n)` for every `i` of the `n` threads of the current pool (`n` = 1:
/// just `share(0, 1)`), share 0 on this thread; returns when all have returned. The other
/// shares are queued where idle workers steal them, so that with two threads the other
/// one runs share 1, and a caller that splits its work the same way in every layer has
/// each thread read mostly what it wrote itself. No deadlock with
/// [`with_workers_awake`]: a thief steals the oldest job first, that pass's spinning
/// loop before any share. A thread that is done waits for the others running whatever
/// the pool has (another pass's shares among it) rather than in rayon's own wait, which
/// sleeps after a few µs and then took tens of µs to wake when the last share ended (a
/// layer 29–57 µs after its last share, with `rayon::broadcast`).
pub fn for_each_share(share: impl Fn(usize, usize) + Sync) {
    let n = rayon::current_num_threads();
    if n < 2 {
        return share(0, 1);
    }
    let done = AtomicUsize::new(0);
    let run = |i: usize| {
        // Counted on the way out even if the share panics, so that the wait below ends
        // and the scope passes the panic on.
        struct Count<'a>(&'a AtomicUsize);
        impl Drop for Count<'_> {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::AcqRel);
            }
        }
        let _count = Count(&done);
        share(i, n);
    };
    rayon::scope(|s| {
        for i in 1..n {
            s.spawn(move |_| run(i));
        }
        run(0);
        while done.load(Ordering::Acquire) < n {
            if rayon::yield_now() != Some(rayon::Yield::Executed) {
                std::hint::spin_loop();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Workers in [`linger_while`] now.
    static LINGERING: AtomicUsize = AtomicUsize::new(0);

    /// Counts a lingering worker while it lives.
    pub(super) struct Lingering;

    impl Lingering {
        pub(super) fn new() -> Self {
            LINGERING.fetch_add(1, Ordering::AcqRel);
            Lingering
        }
    }

    impl Drop for Lingering {
        fn drop(&mut self) {
            LINGERING.fetch_sub(1, Ordering::AcqRel);
        }
    }

    #[test]
    fn after_a_pass_the_other_worker_lingers() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        // Other tests' passes stop lingering workers as they begin: a few tries.
        let seen = (0..50).any(|_| {
            pool.install(|| with_workers_awake(Duration::from_secs(2), || ()));
            let until = Instant::now() + Duration::from_millis(100);
            while Instant::now() < until {
                if LINGERING.load(Ordering::Acquire) > 0 {
                    return true;
                }
                std::thread::yield_now();
            }
            false
        });
        assert!(seen, "no worker lingered after a pass");
        stop_lingering();
    }

    #[test]
    fn a_pass_runs_with_the_workers_awake_and_returns_its_value() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let sum: u64 = pool.install(|| {
            with_workers_awake(Duration::ZERO, || {
                // Many short parallel loops, as in a pass.
                (0..200u64)
                    .map(|i| (0..1000u64).into_par_iter().map(|j| i * j).sum::<u64>())
                    .sum()
            })
        });
        assert_eq!(sum, (0..200u64).sum::<u64>() * (0..1000u64).sum::<u64>());
    }

    /// The workers can be claimed again within `secs` (other tests' passes hold them for
    /// moments at a time).
    fn released_within(secs: u64) -> bool {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < until {
            if claim().is_some() {
                return true;
            }
            std::thread::yield_now();
        }
        false
    }

    #[test]
    fn concurrent_passes_on_one_pool_finish() {
        // Passes from four threads at once, each loop split into single items so that
        // workers steal from each other all the time.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let pass = |k: u64| {
            pool.install(|| {
                with_workers_awake(Duration::ZERO, || {
                    (0..100u64)
                        .map(|i| {
                            (0..64usize)
                                .into_par_iter()
                                .with_max_len(1)
                                .map(|j| (i + j as u64) * k)
                                .sum::<u64>()
                        })
                        .sum::<u64>()
                })
            })
        };
        let expect = |k: u64| {
            (0..100u64)
                .map(|i| (0..64u64).map(|j| (i + j) * k).sum::<u64>())
                .sum::<u64>()
        };
        std::thread::scope(|s| {
            let hs: Vec<_> = (1..=4u64)
                .map(|k| s.spawn(move || (0..50).map(|_| pass(k)).collect::<Vec<u64>>()))
                .collect();
            for (k, h) in (1..=4u64).zip(hs) {
                assert!(h.join().unwrap().iter().all(|&r| r == expect(k)));
            }
        });
    }

    #[test]
    fn a_pass_from_outside_any_pool_runs_in_the_global_pool() {
        assert_eq!(rayon::current_thread_index(), None);
        let on = with_workers_awake(Duration::ZERO, || (rayon::current_thread_index(), 5));
        assert_eq!(on.1, 5);
        assert!(on.0.is_some());
    }

    #[test]
    fn every_share_runs_once_and_a_panicking_one_is_passed_on() {
        for threads in 1..=4 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let seen: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
            pool.install(|| {
                with_workers_awake(Duration::ZERO, || {
                    for_each_share(|i, n| {
                        assert_eq!(n, threads);
                        seen[i].fetch_add(1, Ordering::Relaxed);
                    })
                })
            });
            assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.install(|| for_each_share(|i, n| assert!(i + 1 < n, "the last share")))
            }));
            assert!(r.is_err());
        }
    }

    #[test]
    fn a_lingering_worker_stops_when_a_pass_begins_or_its_time_is_up() {
        let passes = AtomicUsize::new(7);
        let far = Instant::now() + Duration::from_secs(60);
        std::thread::scope(|s| {
            let h = s.spawn(|| linger_while(&passes, 7, far));
            std::thread::sleep(Duration::from_millis(20));
            assert!(!h.is_finished(), "stopped with no pass and time left");
            passes.fetch_add(1, Ordering::AcqRel);
            let start = Instant::now();
            h.join().unwrap();
            assert!(start.elapsed() < Duration::from_secs(5));
        });
        let start = Instant::now();
        linger_while(&passes, 8, start + Duration::from_millis(30));
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(30) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[test]
    fn a_pass_that_lingers_returns_at_once_with_its_value() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let start = Instant::now();
        let v = pool.install(|| with_workers_awake(Duration::from_secs(30), || 11));
        assert_eq!(v, 11);
        assert!(start.elapsed() < Duration::from_secs(10));
        // The lingering worker takes the pool's next work (and the next pass stops it).
        let sum: u64 = pool
            .install(|| with_workers_awake(Duration::ZERO, || (0..1000u64).into_par_iter().sum()));
        assert_eq!(sum, 499_500);
    }

    #[test]
    fn a_panicking_pass_releases_the_workers() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.install(|| with_workers_awake(Duration::ZERO, || panic!("a failing pass")))
        }));
        assert!(r.is_err());
        assert!(released_within(10));
        assert_eq!(pool.install(|| with_workers_awake(Duration::ZERO, || 7)), 7);
        assert!(released_within(10));
    }
}
