//! The calling thread as worker 0 of the global pool (`join_global_pool`): alone in its
//! own test binary, since a process has one global pool and it decides it once.

mod common;

use dynsparse::{demo, join_global_pool, Options, Runtime};

#[test]
fn a_caller_in_the_global_pool_runs_passes_that_match_a_pool_of_their_own() {
    assert!(join_global_pool(Some(0)).is_err(), "no workers at all");
    join_global_pool(Some(3)).expect("no global pool before this");
    assert_eq!(rayon::current_thread_index(), Some(0));
    assert_eq!(rayon::current_num_threads(), 3);
    let imgs = common::heldout_images(8);
    let here = Runtime::from_bytes(demo::MODEL, Options::default())
        .unwrap()
        .infer(&imgs)
        .unwrap();
    let apart = Runtime::from_bytes(
        demo::MODEL,
        Options {
            threads: Some(2),
            ..Options::default()
        },
    )
    .unwrap()
    .infer(&imgs)
    .unwrap();
    for (a, b) in here.iter().zip(&apart) {
        assert!(common::rel_err(&a.logits, &b.logits) < 1e-6);
        assert_eq!(a.top[0].class, b.top[0].class);
    }
    let err = join_global_pool(None).expect_err("the global pool exists");
    assert!(err.to_string().contains("global pool"), "{err}");
}
