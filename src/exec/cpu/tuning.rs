//! Choices that depend on the CPU's microarchitecture and not only on the instruction
//! set it offers: where two machines running the same micro-kernels disagree on which of
//! two ways is faster, measured on each.
//!
//! Both choices concern Winograd's F(2×2, 3×3), and both were found by switching one
//! way for the other pass by pass on each machine (the numbers are beside the
//! constants). On the AMD EPYC (Zen 4, 1 MiB of L2 per core) the direct convolution at
//! 56 × 56 runs close enough to the micro-kernel's peak that Winograd's transforms cost
//! what its multiply-adds save, and dense 7 × 7 planes run best on the packed filters.
//! On the Intel Xeon (Emerald Rapids, 2 MiB of L2 per core) the direct convolution at
//! 56 × 56 ran at 84–130 GFLOP/s on one thread where the micro-kernel alone reaches
//! 150–168, so Winograd pays there; and a dense 7 × 7 plane at batch 1 ran fastest on
//! the filters as lines, which read only the bytes each multiply-add needs — consistent
//! with that machine streaming weights from L3 more slowly, though not measured as such.

/// Per-microarchitecture choices of the CPU engine.
///
/// ```
/// use dynsparse::exec::cpu::Tuning;
/// let t = Tuning::detect();
/// assert!(t == Tuning::DEFAULT || t == Tuning::INTEL);
/// assert!(Tuning::INTEL.winograd_wide_width > Tuning::DEFAULT.winograd_wide_width);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tuning {
    /// Widest output row at which a 3×3, stride-1 layer runs by Winograd, dense or keeping
    /// most of its channel pairs (see the engine's `WINOGRAD_WIDE_MIN_KEPT`). Other plans
    /// run by Winograd only up to 28 wide whatever this is.
    pub winograd_wide_width: usize,
    /// The largest share of a 3×3 layer's (output, input) channel pairs that a one-sample
    /// plan over a plane of at most 16 Winograd tiles (7 × 7) keeps and still runs on
    /// the filters as one cache line per channel pair rather than the packed ones;
    /// 1.0 sends dense plans there too.
    pub lines_max_kept: f64,
}

impl Tuning {
    /// Measured on the AMD EPYC (Zen 4) and the AVX2 machine of earlier sessions:
    /// Winograd at 56 × 56 took 1.06–1.23× the direct convolution's time dense and
    /// 1.03–1.30× gated; dense 7 × 7 plans on the lines 1.03–1.15× the packed way's.
    pub const DEFAULT: Tuning = Tuning {
        winograd_wide_width: 28,
        lines_max_kept: 0.85,
    };

    /// Measured on the Intel Xeon (Emerald Rapids, two vCPUs), one engine, the way
    /// switched pass by pass (30–40 pairs, 2 threads). Winograd at 56 × 56, dense:
    /// ResNet-18's `layer1` 0.80–0.88 of the direct time at batch 1, 0.72–0.77 at batch 8,
    /// passes 0.96–0.97 and 0.92; ResNet-50's 0.90–0.93 and 0.83–0.93, passes 0.99 and
    /// 0.98. Gated, it pays where a plan keeps most channel pairs (ResNet-18's `layer1` at
    /// budget 0.5, 0.56 of them: 0.81–0.91 at batch 1, 0.85–0.93 at batch 8), not where
    /// it keeps few (ResNet-50's `conv2` layers, 0.32: 1.25–1.33); see the engine's
    /// `WINOGRAD_WIDE_MIN_KEPT`. Dense 7 × 7 planes at batch 1 on the lines: 0.72–0.73 of
    /// the packed way's time (ResNet-18's `layer4`), 0.63–0.67 (ResNet-50's), passes 0.93
    /// and 0.96; 0.86–0.88 and 0.80–0.86 of the direct convolution's.
    pub const INTEL: Tuning = Tuning {
        winograd_wide_width: 56,
        lines_max_kept: 1.0,
    };

    /// The choices for this CPU: [`Self::INTEL`] on Intel processors, [`Self::DEFAULT`]
    /// elsewhere.
    pub fn detect() -> Tuning {
        if is_intel() {
            Tuning::INTEL
        } else {
            Tuning::DEFAULT
        }
    }
}

/// Whether CPUID names the vendor Intel.
fn is_intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let id = std::arch::x86_64::__cpuid(0);
        let word = |s: &[u8; 4]| u32::from_le_bytes(*s);
        (id.ebx, id.edx, id.ecx) == (word(b"Genu"), word(b"ineI"), word(b"ntel"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}
