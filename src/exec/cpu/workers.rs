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
//! [`for_each_share`] splits a layer's work into one fixed share per thread.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Whether some pass in this process has the workers spinning for it. A precaution for
/// concurrent passes: a thread waiting for a job runs whatever it can steal, which may be
/// another pass's spinning loop, and that only returns when the other pass ends. Two
/// passes whose threads each held the other's loop would never end; that was not seen
/// (nor shown impossible beyond two threads), and one pass at a time rules it out.
static CLAIMED: AtomicBool = AtomicBool::new(false);

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
/// No deadlock within a pass: the spinning loops are queued before `pass` runs, at the
/// old end of this thread's queue, the end other workers steal from. A worker takes one
/// before it can take any job of `pass`, so this thread never waits for a job of `pass`
/// with a spinning loop still queued behind it; one it runs itself at the end (never
/// stolen) finds the pass done and returns.
pub fn with_workers_awake<R: Send>(pass: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_none() {
        return rayon::scope(|_| with_workers_awake(pass));
    }
    let threads = rayon::current_num_threads();
    if threads < 2 {
        return pass();
    }
    let Some(_release) = claim() else {
        return pass();
    };
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
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
    })
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

    #[test]
    fn a_pass_runs_with_the_workers_awake_and_returns_its_value() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let sum: u64 = pool.install(|| {
            with_workers_awake(|| {
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
                with_workers_awake(|| {
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
        let on = with_workers_awake(|| (rayon::current_thread_index(), 5));
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
                with_workers_awake(|| {
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
    fn a_panicking_pass_releases_the_workers() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.install(|| with_workers_awake(|| panic!("a failing pass")))
        }));
        assert!(r.is_err());
        assert!(released_within(10));
        assert_eq!(pool.install(|| with_workers_awake(|| 7)), 7);
        assert!(released_within(10));
    }
}
