//! Choices that depend on the CPU's microarchitecture and not only on the instruction
//! set it offers: where two machines running the same micro-kernels disagree on which of
//! two ways is faster, measured on each.
//!
//! Most choices concern Winograd's algorithms; the others the depthwise kernels' strips
//! and the panels of 1×1 layers over 14 × 14 planes. All were found by switching one way
//! for the other pass by pass on each machine (the numbers are beside the constants). On
//! the AMD EPYC of Zen 4 (1 MiB of L2 per core) the direct convolution at 56 × 56 runs
//! close enough to the micro-kernel's peak that F(2×2, 3×3)'s transforms, as they were
//! then, cost what its multiply-adds saved; once the transforms stored straight into the
//! panels, F(4×4, 3×3) (a quarter of the direct multiply-adds) took half the direct
//! time there ([`Tuning::ZEN4`]). Dense 7 × 7 planes run best on the packed filters.
//! On the Intel Xeon (Emerald Rapids, 2 MiB of L2 per core) the direct convolution at
//! 56 × 56 ran at 84–130 GFLOP/s on one thread where the micro-kernel alone reaches
//! 150–168, so Winograd pays there; and a dense 7 × 7 plane at batch 1 ran fastest on
//! the filters as lines, which read only the bytes each multiply-add needs — consistent
//! with that machine streaming weights from L3 more slowly, though not measured as such.
//! Zen 5 runs 512-bit multiply-adds at full width, twice Zen 4's rate per cycle: the
//! micro-kernel reaches 265 GFLOP/s on one thread, while the direct convolution at
//! 56 × 56 stays at 73–75% of the two threads' peak, so Winograd pays there, as on the
//! Intel Xeon; by F(4×4, 3×3), whose GEMMs do 0.56 of F(2×2, 3×3)'s multiply-adds, for
//! dense plans and for gated ones that keep at least 0.25 of their channel pairs. At
//! 28 × 28, where a plane is four times fewer tiles and `U` four times the direct
//! weights' bytes, F(4×4, 3×3) won dense on ResNet-18 and lost on ResNet-50 and gated;
//! F(2×2, 3×3) stays there. The other machines have not run F(4×4, 3×3): their tunings
//! leave it out.

use super::gemm::Isa;

/// Per-microarchitecture choices of the CPU engine.
///
/// ```
/// use dynsparse::exec::cpu::Tuning;
/// let t = Tuning::detect();
/// assert!([Tuning::DEFAULT, Tuning::INTEL, Tuning::ZEN4, Tuning::ZEN5].contains(&t));
/// assert!(Tuning::INTEL.winograd_wide_width > Tuning::DEFAULT.winograd_wide_width);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tuning {
    /// Widest output row at which a 3×3, stride-1 layer runs by Winograd, dense or keeping
    /// at least [`Self::winograd_wide_min_kept`] of its channel pairs. Other plans run by
    /// Winograd only up to 28 wide whatever this is.
    pub winograd_wide_width: usize,
    /// The least share of a 3×3 layer's (output, input) channel pairs a plan keeps to run
    /// by Winograd over rows wider than 28 (where [`Self::winograd_wide_width`] is
    /// wider; dense plans keep 1.0). Over few kept channels the direct convolution of
    /// the kept pairs was the faster.
    pub winograd_wide_min_kept: f64,
    /// The largest share of a 3×3 layer's (output, input) channel pairs that a one-sample
    /// plan over a plane of at most 16 Winograd tiles (7 × 7) keeps and still runs on
    /// the filters as one cache line per channel pair rather than the packed ones;
    /// 1.0 sends dense plans there too.
    pub lines_max_kept: f64,
    /// The least output width at which a layer that runs by Winograd has its filters
    /// transformed for F(4×4, 3×3) instead of F(2×2, 3×3) (`usize::MAX`: none), for
    /// every plan of the layer.
    pub winograd_f4_min_width: usize,
    /// Bytes a strip of depthwise planes in lanes holds at most (its interleaved padded
    /// input rows and outputs; `depthwise_lanes::strip_rows`). A group of whole planes
    /// over 56 × 56 or more would leave L2 (207 KiB at 56 × 56 with eight lanes, 0.8 MB
    /// at 112 × 112); smaller strips pay for the input rows their windows share with
    /// the next strip.
    pub depthwise_strip_bytes: usize,
    /// K from which an AVX-512 1×1 layer over planes of 64 to 255 values that are not a
    /// whole number of 64-byte lines (14 × 14) packs its panels rather than reading them
    /// in place (`usize::MAX`: never). Read in place, a K block of a panel spans three
    /// lines per row instead of two; packed, the copy costs a pass over the input.
    pub pack_misaligned_avx512: usize,
    /// K per block of a convolution's packed GEMM, and of a transposed 1×1 layer's
    /// (`usize::MAX`: K whole): each block of a tile's accumulation runs over every tile
    /// of its task before the next block, the accumulators kept in memory between blocks
    /// ([`super::gemm::KC`] keeps a panel's block in L1 for every row tile).
    pub gemm_kc: usize,
    /// Whether a gated 1×1 layer over a small plane (and a gated stride-2 one) with a
    /// long K also holds its weights row by row, for plans that keep some of its rows
    /// and every input channel to read each kept row as its own stream rather than
    /// from the packed blocks (AVX-512 only; see `EngineExecutor::without_rows_major`).
    pub rows_major: bool,
}

impl Tuning {
    /// For CPUs not measured, and the AVX2 machine of earlier sessions. Measured there and
    /// on the AMD EPYC (Zen 4) before [`Self::ZEN4`], with the transforms of the time:
    /// Winograd at 56 × 56 took 1.06–1.23× the direct convolution's time dense and
    /// 1.03–1.30× gated; dense 7 × 7 plans on the lines 1.03–1.15× the packed way's.
    /// (`winograd_wide_min_kept` is moot where no layer wider than 28 runs by Winograd.)
    /// F(4×4, 3×3) was not measured there.
    ///
    /// Depthwise strips of 64 KiB, measured with eight lanes: one-layer models,
    /// in-process pairs (100), the layer's time in lanes against plane by plane, one /
    /// two threads, with strips of 16, 32 and 64 KiB and whole planes: 3×3 at 56 × 56
    /// (144 channels) 0.90 / 0.91, 0.81 / 0.87, 0.82 / 0.95, 0.81 / 0.90; at 112 × 112
    /// (32) 1.24 / 1.17, 0.98 / 0.97, 0.92 / 0.90, 0.99 / 1.23; stride 2 112 → 56 (96)
    /// 0.85 / 0.83, 0.80 / 0.82, 0.78 / 0.81, 0.84 / 1.18; 28 × 28 (192, one strip from
    /// 64 KiB) 0.61 / 0.69, 0.66 / 0.71, 0.59 / 0.64, 0.64 / 0.74. With whole planes on
    /// two threads the plane-by-plane kernels had won at 112 × 112 and tied or won at
    /// 56 × 56 in whole passes (MobileNetV2 1.00, EfficientNet-Lite0 1.07 of the time).
    pub const DEFAULT: Tuning = Tuning {
        winograd_wide_width: 28,
        winograd_wide_min_kept: 0.45,
        lines_max_kept: 0.85,
        winograd_f4_min_width: usize::MAX,
        depthwise_strip_bytes: 64 << 10,
        pack_misaligned_avx512: super::engine::PACK_MISALIGNED_FROM,
        gemm_kc: super::gemm::KC,
        rows_major: true,
    };

    /// Measured on the Intel Xeon (Emerald Rapids, two vCPUs), one engine, the way
    /// switched pass by pass (30–40 pairs, 2 threads). Winograd at 56 × 56, dense:
    /// ResNet-18's `layer1` 0.80–0.88 of the direct time at batch 1, 0.72–0.77 at batch 8,
    /// passes 0.96–0.97 and 0.92; ResNet-50's 0.90–0.93 and 0.83–0.93, passes 0.99 and
    /// 0.98. Gated, it pays where a plan keeps most channel pairs: ResNet-18's `layer1`
    /// at budget 0.5, 0.56 of the pairs, took 0.81–0.91 of the direct time at batch 1 and
    /// 0.85–0.93 at batch 8, passes 0.976–0.982 and 0.960–0.968; at budget 0.75,
    /// 0.78–0.81, the pass 0.943. Not where it keeps few: ResNet-50's `layer1` `conv2`
    /// layers, 0.32 of the pairs at budget 0.5, took 1.25–1.33 (batch 1). Dense 7 × 7
    /// planes at batch 1 on the lines: 0.72–0.73 of the packed way's time (ResNet-18's
    /// `layer4`), 0.63–0.67 (ResNet-50's), passes 0.93 and 0.96; 0.86–0.88 and 0.80–0.86
    /// of the direct convolution's. F(4×4, 3×3) was not measured there.
    pub const INTEL: Tuning = Tuning {
        winograd_wide_width: 56,
        winograd_wide_min_kept: 0.45,
        lines_max_kept: 1.0,
        winograd_f4_min_width: usize::MAX,
        depthwise_strip_bytes: 64 << 10,
        pack_misaligned_avx512: super::engine::PACK_MISALIGNED_FROM,
        gemm_kc: super::gemm::KC,
        rows_major: true,
    };

    /// Measured on the AMD EPYC of Zen 5 (family 26, two vCPUs), one engine, the way
    /// switched pass by pass (`examples/engine_ab.rs --tuning`, 30 alternating passes, 2
    /// threads). Winograd at 56 × 56, dense: passes 0.958 (ResNet-18) and 0.968
    /// (ResNet-50) of the direct time at batch 1, 0.968 and 0.977 at batch 8. Gated at
    /// budget 0.5 (ResNet-18's `layer1`, 0.56 of the pairs) it paid at batch 1 and lost
    /// at batch 8: passes 0.976 and 1.028 (ResNet-50 0.995 and 1.002). Per layer (each
    /// side's median layer time, in an earlier run whose pairs flipped order): dense,
    /// ResNet-18's `layer1` 0.83–0.92 and ResNet-50's `conv2` layers 0.81–0.84; gated at
    /// batch 8, ResNet-18's `conv1` layers 1.21–1.23; dense 7 × 7 planes on the lines
    /// 1.13–1.15 of the packed way's time (ResNet-50's `layer4`), as on Zen 4. Gated
    /// plans that keep at least 0.65 of the pairs (budget 0.75) ran by Winograd there:
    /// at batch 1 passes 0.965 (ResNet-18; its `layer1` layers 0.86–0.96) and 0.974
    /// (ResNet-50), at batch 8 1.011 (`conv1` 1.05–1.07) and 0.978; at budgets 0.6 and
    /// 0.5 (0.56 of the pairs or fewer) the direct convolution stayed.
    ///
    /// F(4×4, 3×3) at 56 × 56 (`--tuning 56,0.65,0.85,56 --against 56,0.65,0.85`, both
    /// sides 0.65, a slow stretch): passes 0.980 (ResNet-18) and 0.986 (ResNet-50) of the
    /// F(2×2, 3×3) time at batch 1, 0.952 and 0.989 at batch 8 (12 pairs), 0.913 and
    /// 0.979 at budget 0.75; ResNet-50's `layer1` `conv2` layers 0.75–0.84. With it,
    /// gated plans from 0.45 of the pairs (`--tuning 56,0.45,0.85,56 --against
    /// 56,0.65,0.85,56`, budget 0.5): 0.980 and 1.004 at batch 1, 0.946 and 1.005 at batch
    /// 8; ResNet-18's `layer1` layers 0.81–0.94. Once gated plans read their kept
    /// columns of `U` from a compact copy rather than through a column map, from 0.25 of
    /// the pairs (`--tuning zen5 --against 56,0.45,0.85,56`): ResNet-50 at budget 0.5
    /// 0.988 and 1.010 at batch 1 (its `layer1` `conv2` layers, 0.32 of the pairs,
    /// 0.78–0.79), 0.984 at batch 8; ResNet-18 0.998 and 0.982; at budget 0.25 1.004 and
    /// 1.002. At 28 × 28 too (`--tuning
    /// 56,0.65,0.85,28 --against 56,0.65,0.85,56`): dense 0.982 and 1.017 at batch 1,
    /// 0.994 and 0.996 at batch 8; at budget 0.5 1.034 and 1.006, the gated 28 × 28
    /// layers 1.10–1.55 (their kept columns of `U` copied are 2.25× the bytes).
    ///
    /// Depthwise strips of 128 KiB rather than 64 (sixteen lanes; one engine, the strip
    /// switched pass by pass, 200 pairs at batch 1 and 40 at batch 8, 2 threads): passes
    /// 0.977–0.985 (MobileNetV2) and 0.978–0.981 (EfficientNet-Lite0) of the time at
    /// batch 1, 0.985–0.988 and 0.968–0.987 at batch 8; 96 KiB 0.965–0.995, 256 KiB
    /// 0.974–0.990. One layer alone on one thread, 128 KiB against 64: stride 2 56 → 28
    /// (144 channels) 0.94, 28 → 14 (192) 0.96; stride 1 at 28 × 28 (192) 0.95; 32 and
    /// 16 KiB took 1.03–1.46.
    ///
    /// 1×1 layers over 14 × 14 planes read in place rather than packed from K = 128 (one
    /// engine, the way switched pass by pass, 2 threads): one layer alone, 384 → 64 and
    /// 576 → 96 took 0.94–0.96 of their time on one thread and 0.88–0.92 on two;
    /// passes (150 pairs at batch 1, 30 at batch 8) 0.985 (MobileNetV2) and 0.977
    /// (EfficientNet-Lite0) at batch 1, 0.993 and 0.988 at batch 8, 0.991 and 0.993 at
    /// budget 0.5; ResNet-50 (40 pairs; 20 at batch 8) 0.986, 0.997 and 1.002, its
    /// `layer3` 1×1 layers 0.89–0.97.
    ///
    /// K whole rather than in blocks of [`super::gemm::KC`]: the tiles' accumulators
    /// stay in registers and their panels and rows of A stream from L2, which Zen 5
    /// (48 KiB L1, 1 MiB L2) serves at the kernel's pace. One layer alone (a throwaway
    /// example, not in the tree), 2 threads, batch 1: 1×1 1024 → 256 at 14 × 14 0.247 ms
    /// against 0.263, 256 → 1024 0.227 / 0.243, 512 → 128 at 28 × 28 0.211 / 0.224,
    /// 2048 → 512 at 7 × 7 0.249 / 0.270 (blocks of 96, 128, 256 and 384: 0.222–0.281,
    /// none the best of the four).
    /// ResNet-50 at batch 1, in process (the block switched pass by pass), against
    /// blocks of 192: K whole 0.950–0.954 of the time, its 1×1 layers 0.88–0.97 and its
    /// stride-2 3×3 layers (K up to 4608) 0.86–0.97; blocks of 512 0.962–0.973, 768
    /// 0.959–0.967, 1152 0.955–0.957. Separate builds alternated as
    /// processes (400 ms visits): dense at batch 1 ResNet-50 0.957, ResNet-18 0.951 and
    /// 0.963, MobileNetV2 0.978, EfficientNet-Lite0 0.991; at batch 8 0.968 and 1.008; at
    /// budget 0.5, batch 1, 0.997, 0.980–0.998, 0.985 and 0.987. Gated 1×1 layers over
    /// 7 × 7 planes that run transposed (`transposed`), in process at budget 0.5, batch
    /// 1: 0.90–0.97 of their time (ResNet-50's `layer4` `conv3`, MobileNetV2's and
    /// EfficientNet-Lite0's projections), passes 0.987–0.990, 0.965–0.995 and
    /// 0.990–0.998; at batch 8 (where none runs transposed) 0.996–1.000.
    pub const ZEN5: Tuning = Tuning {
        winograd_wide_width: 56,
        winograd_wide_min_kept: 0.25,
        lines_max_kept: 0.85,
        winograd_f4_min_width: 56,
        depthwise_strip_bytes: 128 << 10,
        pack_misaligned_avx512: usize::MAX,
        gemm_kc: usize::MAX,
        rows_major: true,
    };

    /// Measured on the AMD EPYC of Zen 4 (family 25, model 17, two vCPUs, 32 KiB L1 and
    /// 1 MiB L2 per core), one engine, the way switched pass by pass
    /// (`examples/engine_ab.rs --without tuning`, 2 threads), after the Winograd
    /// transforms had learned to store straight into the panels. F(4×4, 3×3) at
    /// 56 × 56 (`--tuning 56,0.25,0.85,56` against the default): ResNet-18's passes 0.845
    /// at batch 1 and 0.796 at batch 8 (Zen 5's whole tuning, `--layers`: 0.854, its
    /// `layer1` layers 0.44–0.50 of the direct time); ResNet-50 0.976 and 0.938; at budget 0.5 ResNet-18 0.840, ResNet-50
    /// 1.002 (gated plans by Winograd from 0.25 of the pairs against 0.45: 0.993; from
    /// 0.65, ResNet-18 0.982). F(4×4, 3×3) at 28 × 28 as well: 1.028 and 0.987
    /// (ResNet-18, batch 1 and 8), 1.011 and 0.984 (ResNet-50): left out. K whole rather
    /// than in blocks of [`super::gemm::KC`] (both sides with F(4×4, 3×3)): ResNet-50
    /// 0.978 and 0.979 at batch 1 and 8, 0.979 at budget 0.5; ResNet-18 0.997;
    /// MobileNetV2 0.986, 0.984 and 0.974; EfficientNet-Lite0 0.979, 0.991 and 0.975.
    /// Depthwise strips of 128 KiB: 1.003 and 1.011 (MobileNetV2, Lite0) at batch 1, then
    /// 0.994 and 0.986 (150 pairs); 0.968 and 0.966 at batch 8, then 1.006 and 0.998; 96
    /// KiB 1.000 and 0.988 at batch 1: within the noise, the default's 64 stay. Dense
    /// 7 × 7 planes on the lines (`lines_max_kept` 1.0): ResNet-18 1.069 and ResNet-50
    /// 1.038; gated ones off them (0.0) at budget 0.5: 1.081 and 1.031: 0.85 stays. 1×1
    /// layers over 14 × 14 planes read in place rather than packed: 1.001 and 0.996
    /// (MobileNetV2, Lite0): the default stays. Gated layers' weights held row by row as
    /// well (`--without rows-major`, ResNet-50 at budget 0.5, 60 pairs): passes 1.011
    /// and 1.009 of the time without them at batch 1, 1.001 at batch 8 (12 pairs), the
    /// layers that read them (`layer3` and `layer4` `conv1`) 1.04–1.10 in every run,
    /// where a control of two engines alike moved single layers 0.97–1.04 and the pass
    /// 1.003; one such layer alone (1024 → 256 at 14 × 14, 2048 → 512 at 7 × 7, 0.56 of
    /// the rows kept, weights in L3) 1.04–1.26 against reading the packed blocks. So
    /// not on Zen 4, which saves ResNet-50 16 MB.
    ///
    /// So Zen 5's choices but for two that stay the default's, and no weights row by row.
    pub const ZEN4: Tuning = Tuning {
        depthwise_strip_bytes: Tuning::DEFAULT.depthwise_strip_bytes,
        pack_misaligned_avx512: Tuning::DEFAULT.pack_misaligned_avx512,
        rows_major: false,
        ..Tuning::ZEN5
    };

    /// The choices for this CPU: [`Self::INTEL`] on Intel processors, [`Self::ZEN5`] on
    /// AMD processors of family 26 (Zen 5) and later, [`Self::ZEN4`] on those of family
    /// 25 with AVX-512 (Zen 4; Zen 3, without it, was never measured), [`Self::DEFAULT`]
    /// elsewhere.
    pub fn detect() -> Tuning {
        match vendor() {
            Vendor::Intel => Tuning::INTEL,
            Vendor::Amd { family } if family >= 0x1a => Tuning::ZEN5,
            Vendor::Amd { family: 0x19 } if Isa::detect() == Isa::Avx512 => Tuning::ZEN4,
            _ => Tuning::DEFAULT,
        }
    }
}

/// Who made the CPU, as CPUID names it.
enum Vendor {
    Intel,
    /// With the family CPUID reports (base family plus extended family).
    Amd {
        family: u32,
    },
    Other,
}

fn vendor() -> Vendor {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        let id = __cpuid(0);
        let word = |s: &[u8; 4]| u32::from_le_bytes(*s);
        let name = (id.ebx, id.edx, id.ecx);
        if name == (word(b"Genu"), word(b"ineI"), word(b"ntel")) {
            Vendor::Intel
        } else if name == (word(b"Auth"), word(b"enti"), word(b"cAMD")) {
            let eax = __cpuid(1).eax;
            let base = (eax >> 8) & 0xf;
            let family = if base == 0xf {
                base + ((eax >> 20) & 0xff)
            } else {
                base
            };
            Vendor::Amd { family }
        } else {
            Vendor::Other
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    Vendor::Other
}
