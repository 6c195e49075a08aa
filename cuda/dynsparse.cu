// dynsparse CUDA kernels. Compiled at run time by NVRTC (see src/exec/cuda/nvrtc.rs);
// no CUDA headers are included so that the compile needs nothing but libnvrtc.
//
// Layout: activations are NHWC float32. Every per-sample plan lives in device memory as
// flat index lists plus counts, sized for the worst case (everything kept):
//   oc_idx[n * cout + j], oc_cnt[n]   kept output channels of sample n (sorted)
//   ic_idx[n * cin + k],  ic_cnt[n]   kept input channels
//   tile_idx[n * tiles + t], tile_cnt[n]  kept output tiles (g x g pixels, row-major tiles)
// Kernels read the counts on the device and launch fixed grids whose blocks exit early
// past the count, so one captured CUDA graph serves every plan without host round trips.

#define ACT_NONE 0
#define ACT_RELU 1
#define ACT_RELU6 2

struct ConvParams {
    int h, w, cin;        // input
    int oh, ow, cout;     // output
    int kh, kw, sh, sw;   // window and stride
    int pt, pl;           // padding top / left (bottom/right follow from the output size)
    int g, tiles_w, tiles;// spatial tile edge, tiles per row, tiles per sample
    int act;
    int has_res;
    int split_max;        // most K splits a block grid holds (1: no split-K)
    int target_blocks;    // blocks that fill the device once (SMs x resident blocks)
    int batch;
};

// K splits for sample n's plan: enough blocks to fill the device, at most split_max and
// at least two K slices per split. The convolution and its finishing pass agree on it
// because both compute it from the same counts.
__device__ __forceinline__ int conv_splits(const ConvParams& p, int npos, int nco, int nci) {
    if (p.split_max <= 1) return 1;
    int blocks = ((npos + 63) / 64) * ((nco + 63) / 64) * p.batch;
    int iters = p.kh * p.kw * ((nci + 15) / 16);
    int s = p.target_blocks / (blocks > 0 ? blocks : 1);
    s = min(s, p.split_max);
    s = min(s, iters / 2);
    return max(s, 1);
}

__device__ __forceinline__ float apply_act(float v, int act) {
    if (act == ACT_RELU) return fmaxf(v, 0.0f);
    if (act == ACT_RELU6) return fminf(fmaxf(v, 0.0f), 6.0f);
    return v;
}

__device__ __forceinline__ unsigned to_tf32(float f) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
    return r;
}

// Output position j (in tile order) of a sample -> (oy, ox); false for the pixels of an
// edge tile that fall outside the image.
__device__ __forceinline__ bool tile_pos(const int* tiles, int j, int g, int tiles_w, int oh, int ow,
                                         int* oy, int* ox) {
    int gg = g * g;
    int t = tiles[j / gg];
    int r = j - (j / gg) * gg;
    *oy = (t / tiles_w) * g + r / g;
    *ox = (t % tiles_w) * g + r % g;
    return *oy < oh && *ox < ow;
}

// ---------------------------------------------------------------------------------------
// Sparse convolution as an implicit GEMM on TF32 tensor cores (mma.sync m16n8k8).
//   M = kept output positions of one sample (tile order), N = kept output channels,
//   K = kernel taps x kept input channels.
// A block computes 64 positions x 64 channels with 4 warps (32 x 32 each). K advances 16
// at a time through a 3-stage shared-memory ring filled by cp.async: the gathers (channel
// lists, tile lists, zero padding as zero-fill) are asynchronous copies — 16 bytes when
// a sample keeps every input channel, 4 bytes when its channels are gathered — so two
// slices are in flight while the tensor cores work on the third. Bias, residual and
// activation are fused in the epilogue, which writes only kept outputs.
// Weights are [cout][kh][kw][cin].
// MODE_TF32: operands rounded to TF32 (10-bit mantissa), one m16n8k8 MMA per product.
// MODE_3XTF32: each operand split into a TF32 head and tail, three MMAs per product,
// accuracy close to FP32 at a third of the speed.
// MODE_FP16: operands rounded to FP16 as they leave shared memory (activations and weights
// stay FP32 in memory), one m16n8k16 MMA per 16-deep slice, FP32 accumulation.
// ---------------------------------------------------------------------------------------
#define CBM 64
#define CBN 64
#define CBK 16
#define CSTAGES 3

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned)a;
}

// 4-byte asynchronous copy global -> shared; writes zero when !valid (reads nothing).
__device__ __forceinline__ void cp_async4(unsigned* dst, const float* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async16(unsigned* dst, const float* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }
__device__ __forceinline__ void cp_async_wait_one() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(CSTAGES - 2));
}

// Two FP32 values -> one f16x2 word, `lo` in the low half.
__device__ __forceinline__ unsigned pack_f16x2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ void mma_f16(float* d, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_tf32(float* d, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

#define MODE_TF32 0
#define MODE_3XTF32 1
#define MODE_FP16 2

template <int MODE, bool VEC>
__device__ __forceinline__ void conv_igemm(
    const ConvParams& p, const float* __restrict__ x, const float* __restrict__ wt,
    const float* __restrict__ bias, const float* __restrict__ res, float* __restrict__ y,
    const int* __restrict__ oc_idx, const int* __restrict__ oc_cnt,
    const int* __restrict__ ic_idx, const int* __restrict__ ic_cnt,
    const int* __restrict__ tile_idx, const int* __restrict__ tile_cnt,
    float* __restrict__ ws, unsigned (&As)[CSTAGES][CBM][CBK],
    unsigned (&Bs)[CSTAGES][CBN][CBK]) {
    const int n = blockIdx.z;
    const int gg = p.g * p.g;
    const int npos = tile_cnt[n] * gg;
    const int nco = oc_cnt[n];
    const int nci = ic_cnt[n];
    // Blocks are numbered over this sample's active (position block, channel block,
    // split) triples; the fixed grid's surplus exits here.
    const int pb = (npos + CBM - 1) / CBM, cb = (nco + CBN - 1) / CBN;
    const int splits = conv_splits(p, npos, nco, nci);
    const int id = blockIdx.x;
    if (id >= pb * cb * splits) return;
    const int split = id / (pb * cb);
    const int m0 = (id % pb) * CBM;
    const int n0 = ((id / pb) % cb) * CBN;
    const int* oci = oc_idx + (size_t)n * p.cout;
    const int* ici = ic_idx + (size_t)n * p.cin;
    const int* ti = tile_idx + (size_t)n * p.tiles;

    // VEC (every input channel kept, cin % 4 == 0): a thread copies 4 consecutive
    // channels of 2 rows with one 16-byte cp.async each. Otherwise 1 gathered channel of
    // 8 rows with 4-byte copies.
    constexpr int ROWS = VEC ? 2 : 8;
    constexpr int RSTRIDE = VEC ? 32 : 8;
    const int tid = threadIdx.x;
    const int lk = VEC ? (tid & 3) * 4 : (tid & 15);  // first k column this thread loads
    const int lr = VEC ? (tid >> 2) : (tid >> 4);      // first of its rows

    // Positions this thread loads for A: input origin of each, far outside when invalid.
    int iy0[ROWS], ix0[ROWS];
    const float* xn = x + (size_t)n * p.h * p.w * p.cin;
#pragma unroll
    for (int i = 0; i < ROWS; i++) {
        int j = m0 + lr + RSTRIDE * i;
        int oy, ox;
        if (j < npos && tile_pos(ti, j, p.g, p.tiles_w, p.oh, p.ow, &oy, &ox)) {
            iy0[i] = oy * p.sh - p.pt;
            ix0[i] = ox * p.sw - p.pl;
        } else {
            iy0[i] = -(1 << 28);
            ix0[i] = 0;
        }
    }
    // Output channels this thread loads for B (weight row offsets, or -1).
    const int ktot = p.kh * p.kw * p.cin;
    int wrow[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; i++) {
        int jc = n0 + lr + RSTRIDE * i;
        wrow[i] = jc < nco ? oci[jc] * ktot : -1;
    }

    const int kslices = (nci + CBK - 1) / CBK;
    const int iters_all = p.kh * p.kw * kslices;
    const int it_begin = (int)((long long)iters_all * split / splits);
    const int iters = (int)((long long)iters_all * (split + 1) / splits) - it_begin;

    auto issue = [&](int it, int stage) {
        it += it_begin;
        int tap = it / kslices;
        int kc = (it - tap * kslices) * CBK + lk;
        int ky = tap / p.kw, kx = tap - (tap / p.kw) * p.kw;
        bool kval = kc < nci;
        int ci = VEC ? kc : (kval ? ici[kc] : 0);
#pragma unroll
        for (int i = 0; i < ROWS; i++) {
            int iy = iy0[i] + ky, ix = ix0[i] + kx;
            bool ok = kval && iy >= 0 && iy < p.h && ix >= 0 && ix < p.w;
            const float* xa = ok ? xn + ((size_t)iy * p.w + ix) * p.cin + ci : x;
            bool okb = kval && wrow[i] >= 0;
            const float* wb = okb ? wt + wrow[i] + tap * p.cin + ci : wt;
            if (VEC) {
                cp_async16(&As[stage][lr + RSTRIDE * i][lk], xa, ok);
                cp_async16(&Bs[stage][lr + RSTRIDE * i][lk], wb, okb);
            } else {
                cp_async4(&As[stage][lr + RSTRIDE * i][lk], xa, ok);
                cp_async4(&Bs[stage][lr + RSTRIDE * i][lk], wb, okb);
            }
        }
    };

    const int warp = tid >> 5, lane = tid & 31;
    const int wm = (warp & 1) * 32, wn = (warp >> 1) * 32;
    const int gid = lane >> 2, tig = lane & 3;
    float acc[2][4][4];
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int b = 0; b < 4; b++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0.0f;

#pragma unroll
    for (int st = 0; st < CSTAGES - 1; st++) {
        if (st < iters) issue(st, st);
        cp_async_commit();
    }
    for (int it = 0; it < iters; it++) {
        cp_async_wait_one();  // this thread's copies of slice `it` have landed
        __syncthreads();      // everyone's have, and slice it-1's stage is free again
        const int nxt = it + CSTAGES - 1;
        if (nxt < iters) issue(nxt, nxt % CSTAGES);
        cp_async_commit();
        const int buf = it % CSTAGES;
        // The 16 k of a slice are permuted between the MMA's view and shared memory so
        // that each thread's fragments for the whole slice sit in 4 consecutive words of
        // a row: one 16-byte shared load per row instead of four 4-byte ones. Thread
        // `tig` owns physical k = 4*tig .. 4*tig+3. For m16n8k8 (TF32) step s and
        // fragment half e (k = tig or tig+4) map to physical 4*tig + 2*s + e; for
        // m16n8k16 (FP16) the pairs (2t, 2t+1) and (2t+8, 2t+9) map to 4t..4t+1 and
        // 4t+2..4t+3. A and B use the same map, so the sum over k is unchanged. With
        // rows 16 words apart, a quarter-warp's 16-byte loads hit 8 distinct bank groups.
        float4 ra[2][2], rb[4];
#pragma unroll
        for (int mi = 0; mi < 2; mi++) {
            int r = wm + mi * 16 + gid;
            ra[mi][0] = *reinterpret_cast<const float4*>(&As[buf][r][4 * tig]);
            ra[mi][1] = *reinterpret_cast<const float4*>(&As[buf][r + 8][4 * tig]);
        }
#pragma unroll
        for (int ni = 0; ni < 4; ni++) {
            int c = wn + ni * 8 + gid;
            rb[ni] = *reinterpret_cast<const float4*>(&Bs[buf][c][4 * tig]);
        }
        if (MODE == MODE_FP16) {
            // m16n8k16 fragments: pairs of k packed as f16x2, low half first.
            unsigned af[2][4], bf[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; mi++) {
                af[mi][0] = pack_f16x2(ra[mi][0].x, ra[mi][0].y);
                af[mi][1] = pack_f16x2(ra[mi][1].x, ra[mi][1].y);
                af[mi][2] = pack_f16x2(ra[mi][0].z, ra[mi][0].w);
                af[mi][3] = pack_f16x2(ra[mi][1].z, ra[mi][1].w);
            }
#pragma unroll
            for (int ni = 0; ni < 4; ni++) {
                bf[ni][0] = pack_f16x2(rb[ni].x, rb[ni].y);
                bf[ni][1] = pack_f16x2(rb[ni].z, rb[ni].w);
            }
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++) mma_f16(acc[mi][ni], af[mi], bf[ni]);
            continue;
        }
#pragma unroll
        for (int ks = 0; ks < 2; ks++) {
            unsigned af[2][4], bf[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; mi++) {
                af[mi][0] = __float_as_uint(ks ? ra[mi][0].z : ra[mi][0].x);
                af[mi][1] = __float_as_uint(ks ? ra[mi][1].z : ra[mi][1].x);
                af[mi][2] = __float_as_uint(ks ? ra[mi][0].w : ra[mi][0].y);
                af[mi][3] = __float_as_uint(ks ? ra[mi][1].w : ra[mi][1].y);
            }
#pragma unroll
            for (int ni = 0; ni < 4; ni++) {
                bf[ni][0] = __float_as_uint(ks ? rb[ni].z : rb[ni].x);
                bf[ni][1] = __float_as_uint(ks ? rb[ni].w : rb[ni].y);
            }
            if (MODE == MODE_TF32) {
                // Round to nearest TF32: handing the tensor cores raw FP32 bits truncates,
                // which measured 10-40x larger logit errors on whole networks.
#pragma unroll
                for (int mi = 0; mi < 2; mi++)
#pragma unroll
                    for (int q = 0; q < 4; q++) af[mi][q] = to_tf32(__uint_as_float(af[mi][q]));
#pragma unroll
                for (int ni = 0; ni < 4; ni++)
#pragma unroll
                    for (int q = 0; q < 2; q++) bf[ni][q] = to_tf32(__uint_as_float(bf[ni][q]));
            } else {
                unsigned at[2][4], bt[4][2];
#pragma unroll
                for (int mi = 0; mi < 2; mi++)
#pragma unroll
                    for (int q = 0; q < 4; q++) {
                        float v = __uint_as_float(af[mi][q]);
                        af[mi][q] = to_tf32(v);
                        at[mi][q] = to_tf32(v - __uint_as_float(af[mi][q]));
                    }
#pragma unroll
                for (int ni = 0; ni < 4; ni++)
#pragma unroll
                    for (int q = 0; q < 2; q++) {
                        float v = __uint_as_float(bf[ni][q]);
                        bf[ni][q] = to_tf32(v);
                        bt[ni][q] = to_tf32(v - __uint_as_float(bf[ni][q]));
                    }
#pragma unroll
                for (int mi = 0; mi < 2; mi++)
#pragma unroll
                    for (int ni = 0; ni < 4; ni++) {
                        mma_tf32(acc[mi][ni], at[mi], bf[ni]);
                        mma_tf32(acc[mi][ni], af[mi], bt[ni]);
                    }
            }
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++) mma_tf32(acc[mi][ni], af[mi], bf[ni]);
        }
    }
    cp_async_wait_all();

    if (splits > 1) {
        // Partial sums, compact (position, kept channel) order, one slice per split;
        // conv_splitk_finish adds them up and applies the epilogue.
        float* part = ws + ((size_t)split * p.batch + n) * ((size_t)p.tiles * gg * p.cout);
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
            for (int half = 0; half < 2; half++) {
                int j = m0 + wm + mi * 16 + gid + half * 8;
                if (j >= npos) continue;
#pragma unroll
                for (int ni = 0; ni < 4; ni++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        int jc = n0 + wn + ni * 8 + tig * 2 + e;
                        if (jc < nco) part[(size_t)j * p.cout + jc] = acc[mi][ni][half * 2 + e];
                    }
            }
        return;
    }
    // Epilogue: bias, residual, activation; only kept outputs are written.
    float* yn = y + (size_t)n * p.oh * p.ow * p.cout;
    const float* rn = p.has_res ? res + (size_t)n * p.oh * p.ow * p.cout : nullptr;
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int half = 0; half < 2; half++) {
            int j = m0 + wm + mi * 16 + gid + half * 8;
            int oy, ox;
            if (j >= npos || !tile_pos(ti, j, p.g, p.tiles_w, p.oh, p.ow, &oy, &ox)) continue;
            size_t base = ((size_t)oy * p.ow + ox) * p.cout;
#pragma unroll
            for (int ni = 0; ni < 4; ni++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    int jc = n0 + wn + ni * 8 + tig * 2 + e;
                    if (jc >= nco) continue;
                    int co = oci[jc];
                    float v = acc[mi][ni][half * 2 + e] + bias[co];
                    if (rn) v += rn[base + co];
                    yn[base + co] = apply_act(v, p.act);
                }
        }
}

// Rows (positions of A, channels of B) with K contiguous and 16 words apart: 16-byte copies
// land whole and the 16-byte fragment loads of conv_igemm are free of bank conflicts.
// Declared once per kernel so that both load paths share it.
#define CONV_SMEM                                                   \
    __shared__ __align__(16) unsigned As[CSTAGES][CBM][CBK]; \
    __shared__ __align__(16) unsigned Bs[CSTAGES][CBN][CBK];

// One entry point per arithmetic mode; each picks the 16-byte load path per sample.
#define CONV_ENTRY(NAME, MODE)                                                              \
    extern "C" __global__ void __launch_bounds__(128, 4)                                    \
    NAME(ConvParams p, const float* __restrict__ x, const float* __restrict__ wt,           \
         const float* __restrict__ bias, const float* __restrict__ res,                     \
         float* __restrict__ y, const int* __restrict__ oc_idx,                             \
         const int* __restrict__ oc_cnt, const int* __restrict__ ic_idx,                    \
         const int* __restrict__ ic_cnt, const int* __restrict__ tile_idx,                  \
         const int* __restrict__ tile_cnt, float* __restrict__ ws) {                        \
        CONV_SMEM                                                                           \
        if (ic_cnt[blockIdx.z] == p.cin && (p.cin & 3) == 0)                                \
            conv_igemm<MODE, true>(p, x, wt, bias, res, y, oc_idx, oc_cnt, ic_idx, ic_cnt,  \
                                   tile_idx, tile_cnt, ws, As, Bs);                         \
        else                                                                                \
            conv_igemm<MODE, false>(p, x, wt, bias, res, y, oc_idx, oc_cnt, ic_idx, ic_cnt, \
                                    tile_idx, tile_cnt, ws, As, Bs);                        \
    }

CONV_ENTRY(conv_igemm_tf32, MODE_TF32)
CONV_ENTRY(conv_igemm_3xtf32, MODE_3XTF32)
CONV_ENTRY(conv_igemm_f16, MODE_FP16)

// Second pass of a split-K convolution: sums the splits' partial products and applies
// bias, residual and activation, writing the kept outputs. Samples that ran unsplit
// (their plan filled the device) return at once.
extern "C" __global__ void __launch_bounds__(256)
conv_splitk_finish(ConvParams p, const float* __restrict__ ws, const float* __restrict__ bias,
                   const float* __restrict__ res, float* __restrict__ y,
                   const int* __restrict__ oc_idx, const int* __restrict__ oc_cnt,
                   const int* __restrict__ ic_cnt, const int* __restrict__ tile_idx,
                   const int* __restrict__ tile_cnt) {
    const int n = blockIdx.z;
    const int gg = p.g * p.g;
    const int npos = tile_cnt[n] * gg;
    const int nco = oc_cnt[n];
    const int splits = conv_splits(p, npos, nco, ic_cnt[n]);
    if (splits <= 1) return;
    const size_t slice = (size_t)p.tiles * gg * p.cout;
    const int* oci = oc_idx + (size_t)n * p.cout;
    const int* ti = tile_idx + (size_t)n * p.tiles;
    for (int j = blockIdx.x * blockDim.y + threadIdx.y; j < npos; j += gridDim.x * blockDim.y) {
        int oy, ox;
        if (!tile_pos(ti, j, p.g, p.tiles_w, p.oh, p.ow, &oy, &ox)) continue;
        size_t base = (((size_t)n * p.oh + oy) * p.ow + ox) * p.cout;
        for (int jc = threadIdx.x; jc < nco; jc += blockDim.x) {
            float v = 0.0f;
            for (int s = 0; s < splits; s++)
                v += ws[((size_t)s * p.batch + n) * slice + (size_t)j * p.cout + jc];
            int co = oci[jc];
            v += bias[co];
            if (p.has_res) v += res[base + co];
            y[base + co] = apply_act(v, p.act);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Depthwise convolution (groups == channels), NHWC, weights [kh][kw][c]. One thread per
// kept channel x kept output position; channels are the fastest index so loads coalesce.
// The kept channels are the input's (oc_idx == ic_idx for depthwise).
// ---------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256)
depthwise_conv(ConvParams p, const float* __restrict__ x, const float* __restrict__ wt,
               const float* __restrict__ bias, const float* __restrict__ res,
               float* __restrict__ y, const int* __restrict__ oc_idx,
               const int* __restrict__ oc_cnt, const int* __restrict__ tile_idx,
               const int* __restrict__ tile_cnt) {
    const int n = blockIdx.z;
    const int nc = oc_cnt[n];
    const int jc = blockIdx.y * blockDim.x + threadIdx.x;
    const int npos = tile_cnt[n] * p.g * p.g;
    if (jc >= nc) return;
    const int c = oc_idx[(size_t)n * p.cout + jc];
    const int* ti = tile_idx + (size_t)n * p.tiles;
    const float* xn = x + (size_t)n * p.h * p.w * p.cin;
    for (int j = blockIdx.x * blockDim.y + threadIdx.y; j < npos; j += gridDim.x * blockDim.y) {
        int oy, ox;
        if (!tile_pos(ti, j, p.g, p.tiles_w, p.oh, p.ow, &oy, &ox)) continue;
        float acc = 0.0f;
        int iy0 = oy * p.sh - p.pt, ix0 = ox * p.sw - p.pl;
        for (int ky = 0; ky < p.kh; ky++) {
            int iy = iy0 + ky;
            if (iy < 0 || iy >= p.h) continue;
            for (int kx = 0; kx < p.kw; kx++) {
                int ix = ix0 + kx;
                if (ix < 0 || ix >= p.w) continue;
                acc = fmaf(__ldg(xn + ((size_t)iy * p.w + ix) * p.cin + c),
                           __ldg(wt + (ky * p.kw + kx) * p.cout + c), acc);
            }
        }
        size_t o = (((size_t)n * p.oh + oy) * p.ow + ox) * p.cout + c;
        float v = acc + bias[c];
        if (p.has_res) v += res[o];
        y[o] = apply_act(v, p.act);
    }
}

// Before a sparse convolution: every output of a sample whose plan skips something
// starts as the residual (skipped tiles and channels of a residual block pass the
// identity through) or as zero. Samples with a dense plan return at once.
extern "C" __global__ void init_skipped(float* __restrict__ y, const float* __restrict__ res,
                                        int has_res, long long per_sample,
                                        const int* __restrict__ oc_cnt,
                                        const int* __restrict__ tile_cnt, int cout, int tiles) {
    const int n = blockIdx.y;
    if (oc_cnt[n] == cout && tile_cnt[n] == tiles) return;
    float* yn = y + n * per_sample;
    const float* rn = res + n * per_sample;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < per_sample;
         i += (long long)gridDim.x * blockDim.x)
        yn[i] = has_res ? rn[i] : 0.0f;
}

// NCHW float input -> NHWC.
extern "C" __global__ void nchw_to_nhwc(const float* __restrict__ x, float* __restrict__ y,
                                        int n, int c, int hw) {
    long long total = (long long)n * c * hw;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long ci = i % c;
        long long p = (i / c) % hw;
        long long b = i / ((long long)c * hw);
        y[i] = x[(b * c + ci) * hw + p];
    }
}

// Max pooling, NHWC; padded cells never win.
extern "C" __global__ void maxpool_nhwc(const float* __restrict__ x, float* __restrict__ y, int n,
                                        int h, int w, int c, int oh, int ow, int kh, int kw,
                                        int sh, int sw, int ph, int pw) {
    long long total = (long long)n * oh * ow * c;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int ci = (int)(i % c);
        long long r = i / c;
        int ox = (int)(r % ow);
        r /= ow;
        int oy = (int)(r % oh);
        int b = (int)(r / oh);
        float m = -3.402823466e38f;
        for (int ky = 0; ky < kh; ky++) {
            int iy = oy * sh - ph + ky;
            if (iy < 0 || iy >= h) continue;
            for (int kx = 0; kx < kw; kx++) {
                int ix = ox * sw - pw + kx;
                if (ix < 0 || ix >= w) continue;
                m = fmaxf(m, x[(((long long)b * h + iy) * w + ix) * c + ci]);
            }
        }
        y[i] = m;
    }
}

// PyTorch's adaptive average pooling (global pooling is the 1x1 case), NHWC.
extern "C" __global__ void adaptive_avgpool_nhwc(const float* __restrict__ x, float* __restrict__ y,
                                                 int n, int h, int w, int c, int oh, int ow) {
    long long total = (long long)n * oh * ow * c;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int ci = (int)(i % c);
        long long r = i / c;
        int ox = (int)(r % ow);
        r /= ow;
        int oy = (int)(r % oh);
        int b = (int)(r / oh);
        int y0 = oy * h / oh, y1 = ((oy + 1) * h + oh - 1) / oh;
        int x0 = ox * w / ow, x1 = ((ox + 1) * w + ow - 1) / ow;
        float s = 0.0f;
        for (int iy = y0; iy < y1; iy++)
            for (int ix = x0; ix < x1; ix++) s += x[(((long long)b * h + iy) * w + ix) * c + ci];
        y[i] = s / (float)((y1 - y0) * (x1 - x0));
    }
}

// Fully connected layer: one warp per (sample, output feature); weights [out][in] with
// the input features already in NHWC order.
extern "C" __global__ void linear(const float* __restrict__ x, const float* __restrict__ wt,
                                  const float* __restrict__ bias, float* __restrict__ y, int n,
                                  int in_f, int out_f, int act) {
    int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (gw >= n * out_f) return;
    int b = gw / out_f, o = gw % out_f;
    const float* xr = x + (size_t)b * in_f;
    const float* wr = wt + (size_t)o * in_f;
    float s = 0.0f;
    for (int k = lane; k < in_f; k += 32) s = fmaf(xr[k], wr[k], s);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) y[(size_t)b * out_f + o] = apply_act(s + bias[o], act);
}

// ---------------------------------------------------------------------------------------
// Channel gates, computed on the device so that no decision crosses to the host.
// For a gated convolution with input x (NHWC) and gate weights G [cout][cin], bias gb:
//   pooled[ci] = mean over positions of x[ci]                         (gate_pool)
//   score[co]  = sum over kept ci of G[co][ci] * pooled[ci] + gb[co]   (gate_fc)
//   keep the keep_cnt[n] highest scores (a policy value in device memory, so changing it
//   needs no new graph), ties to the lower index                      (gate_rank)
//   as a sorted index list and a count, written to the layer's plan and to the plans
//   that follow it                                                    (gate_compact)
// Without trained gate weights the runtime uses G = the BN-folded weights summed over the
// window and gb = the bias: the score is then the mean pre-activation output of the
// channel (exact away from the padded border), a training-free saliency.
// ---------------------------------------------------------------------------------------

// Global average pool, NHWC -> [n][c], accumulated with atomics into a zeroed buffer:
// blockDim (32, 8) with channels across x, grid (channel blocks, position chunks, batch)
// so that large feature maps are pooled by many blocks at once.
extern "C" __global__ void gate_pool(const float* __restrict__ x, float* __restrict__ pooled,
                                     int hw, int c) {
    __shared__ float part[8][33];
    const int n = blockIdx.z;
    const int ch = blockIdx.x * 32 + threadIdx.x;
    const int per = (hw + gridDim.y - 1) / gridDim.y;
    const int p0 = blockIdx.y * per, p1 = min(hw, p0 + per);
    float s = 0.0f;
    if (ch < c) {
        const float* xn = x + (size_t)n * hw * c + ch;
        for (int p = p0 + threadIdx.y; p < p1; p += 8) s += xn[(size_t)p * c];
    }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && ch < c) {
        float t = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) t += part[i][threadIdx.x];
        atomicAdd(pooled + (size_t)n * c + ch, t / (float)hw);
    }
}

// Gate scores: one warp per (sample, output channel). Only the layer's kept input
// channels count: the others hold data no plan computed.
extern "C" __global__ void gate_fc(const float* __restrict__ pooled, const float* __restrict__ g,
                                   const float* __restrict__ gb, const int* __restrict__ ic_idx,
                                   const int* __restrict__ ic_cnt, float* __restrict__ score,
                                   int batch, int cin, int cout) {
    int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (gw >= batch * cout) return;
    int n = gw / cout, co = gw % cout;
    const float* pr = pooled + (size_t)n * cin;
    const float* gr = g + (size_t)co * cin;
    const int* ici = ic_idx + (size_t)n * cin;
    const int nci = ic_cnt[n];
    float s = 0.0f;
    for (int k = lane; k < nci; k += 32) {
        int ci = ici[k];
        s = fmaf(gr[ci], pr[ci], s);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) score[(size_t)n * cout + co] = s + gb[co];
}

#define GATE_MAX 4096

// Rank of each channel's score within its sample (ties to the lower index); flags the
// keep_cnt[n] best. Grid (channel blocks of 256, batch); every block sees all scores.
extern "C" __global__ void __launch_bounds__(256)
gate_rank(const float* __restrict__ score, int cout, const int* __restrict__ keep_cnt,
          int* __restrict__ flags) {
    __shared__ float s[GATE_MAX];
    const int n = blockIdx.y;
    const float* sn = score + (size_t)n * cout;
    for (int i = threadIdx.x; i < cout; i += blockDim.x) s[i] = sn[i];
    __syncthreads();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= cout) return;
    const float v = s[i];
    int rank = 0;
    for (int j = 0; j < cout; j++) {
        float u = s[j];
        rank += (u > v) || (u == v && j < i);
    }
    flags[(size_t)n * cout + i] = rank < keep_cnt[n];
}

// Where a gate's decision goes: the gated layer's output-channel list and the lists of
// the layers that follow it (their input channels, or a depthwise layer's channels).
#define GATE_DESTS 4
struct PlanDests {
    int* idx[GATE_DESTS];
    int* cnt[GATE_DESTS];
    int count;
};

// Compacts the flags of each sample (one block of 1024 per sample) into a sorted index
// list, written with its count to every destination.
extern "C" __global__ void __launch_bounds__(1024)
gate_compact(const int* __restrict__ flags, int cout, PlanDests d) {
    __shared__ int warp_sums[32];
    const int n = blockIdx.x;
    const int* fn = flags + (size_t)n * cout;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    int base = 0;
    for (int c0 = 0; c0 < cout; c0 += blockDim.x) {
        const int i = c0 + threadIdx.x;
        const int f = i < cout ? fn[i] : 0;
        int incl = f;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            int t = __shfl_up_sync(0xffffffffu, incl, off);
            if (lane >= off) incl += t;
        }
        if (lane == 31) warp_sums[warp] = incl;
        __syncthreads();
        if (warp == 0) {
            int w = lane < nwarps ? warp_sums[lane] : 0;
            int wi = w;
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                int t = __shfl_up_sync(0xffffffffu, wi, off);
                if (lane >= off) wi += t;
            }
            if (lane < nwarps) warp_sums[lane] = wi - w;  // exclusive prefix per warp
        }
        __syncthreads();
        if (f) {
            const int pos = base + warp_sums[warp] + incl - 1;
#pragma unroll
            for (int k = 0; k < GATE_DESTS; k++)
                if (k < d.count) d.idx[k][(size_t)n * cout + pos] = i;
        }
        __syncthreads();
        if (threadIdx.x == blockDim.x - 1) warp_sums[0] = warp_sums[warp] + incl;
        __syncthreads();
        base += warp_sums[0];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
#pragma unroll
        for (int k = 0; k < GATE_DESTS; k++)
            if (k < d.count) d.cnt[k][n] = base;
    }
}
