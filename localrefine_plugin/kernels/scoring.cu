// Pose scoring: many candidate rotations x shifts per particle, several
// particles per launch. Conventions: localrefine_common.h. Loaded by
// cuda_scoring.py with no_extern_c=True.
//
// For particle i, rotation j, shift s (engine.scoring.score_poses):
//   score[i, j, s] = sum_p w1[i, p] |P_ij(p)|^2 - Re sum_p P_ij(p) Z[i, s, p]
// where P_ij is the central slice of rotation j, times
// exp(sign 2 pi i (kx rx_ij + ky ry_ij) / N) when a per-rotation (fulcrum) origin
// r_ij is given (rotation_shifts_px of score_poses), and
// with, over the P half-plane pixels inside the scoring radius,
//   w1[i, p] = 0.5 * mult_p * ctf_ip^2 / sigma2_i(shell_p)
//   Y[i, p]  = mult_p * ctf_ip / sigma2_i(shell_p) * conj(X_ip)
//   Z[i, s, p] = Y[i, p] * exp(sign 2 pi i (kx_p dx_is + ky_p dy_is) / N)
// (mult_p = 1 on the columns kx = 0 and kx = N/2, else 2), i.e.
// 0.5 sum_k mult |ctf P shift_s - X|^2 / sigma^2 without the pose-free |X|^2.
// sign = +1: RELION moves the projection by -origin, so the model is
// ctf P exp(+2 pi i k.o / N) (engine/scoring.py; the host passes the sign).
// The cross term is a complex matrix product (rotations x pixels) . (pixels x
// shifts): tiles of TJ rotations and TS shifts per block, TP pixels per step;
// the slice values of a tile are interpolated once into shared memory and
// reused by all TS shifts.
#include "localrefine_common.h"

#define LR_TJ 32
#define LR_TP 32
#define LR_THREADS 256

// Z[i, s, p] = Y[i, p] * exp(sign 2 pi i (kx_p dx + ky_p dy) / N).
// grid: (ceil(npix / blockDim.x), S, m).
extern "C" __global__ void phase_table(const float2* __restrict__ y,
                                       const float* __restrict__ shifts, int m, int S,
                                       const float* __restrict__ kx,
                                       const float* __restrict__ ky, int npix, int n,
                                       float sign, float2* __restrict__ z) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    const int s = blockIdx.y;
    const int i = blockIdx.z;
    if (p >= npix || s >= S || i >= m) return;
    const float dx = shifts[2 * ((size_t)i * S + s)];
    const float dy = shifts[2 * ((size_t)i * S + s) + 1];
    float sn, cs;
    sincospif(sign * 2.0f * (kx[p] * dx + ky[p] * dy) / (float)n, &sn, &cs);
    const float2 v = y[(size_t)i * npix + p];
    z[((size_t)i * S + s) * npix + p] = make_float2(v.x * cs - v.y * sn, v.x * sn + v.y * cs);
}

// WIDE mapping: the h-th of a thread's rotations (or shifts) in its tile,
// for the thread's row (or column) r of 16: pairs 2 r + {0, 1}, then 32 further.
__device__ __forceinline__ int lr_wide_index(int r, int h) {
    return 2 * r + 32 * (h >> 1) + (h & 1);
}

// score[i, j, s] for a tile of TJ (32 or 64) rotations and TS (32 or 64)
// shifts of particle i; each thread accumulates TJ/16 rotations x TS/16 shifts
// in registers. grid: (ceil(J / TJ), ceil(S / TS), m); block: (16, 16).
// rot: (m, J, 9) row-major A; rshift: (m, J, 2) pixels or NULL; n: box size;
// sign: of the origin phases (see top);
// w1: (m, npix); z: (m, S, npix); out: (m, J, S).
// CELLS: the slices are read from the cells of radius rc (lr_sample_cells,
// kernel build_cells) instead of the volume (vol; rc unused).
// WIDE: the product's shared-memory reads are halved. Each thread owns pairs
// of neighbouring rotations (2 row + 32 m + e, e = 0, 1) and shifts
// (2 col + 32 m + e), read as one float4 each, and a warp covers 4 rows x 8
// columns of threads instead of 2 x 16: per pixel a warp issues TJ/32 + TS/32
// 16-byte loads, each 64-128 contiguous bytes (one shared-memory wavefront),
// instead of TJ/16 + TS/16 8-byte ones. The rows of the shared tiles are
// padded by 2 values (16-byte alignment) instead of 1, which costs a 4-way
// bank conflict on the tiles' stores (once per pixel and rotation or shift,
// against TJ/16 + TS/16 loads per pixel and thread). Each score is the same
// sum in the same order as with the plain mapping.
// RLANES ("rotation lanes"): the slice values are interpolated with lane ->
// rotation and warp -> pixel instead of lane -> pixel and warp -> rotation.
// The rotations of a tile are neighbouring cells of the local search (a few
// degrees apart), so at one pixel the 32 lanes' trilinear corners fall in a
// few sectors: 7-16 distinct 32-byte sectors per warp-wide load in the
// search's tiles at box 256 against 29-31 with lane -> pixel
// (benchmarks/gather_sectors.py), i.e. fewer L1 wavefronts for the gathers
// that bound the kernel. The slice stores become conflict-free rows. The
// products are the same sums in the same order; the |P|^2 term adds each
// rotation's pixels per warp, then the 8 warps (another order: equal to
// rounding).
template <int TJ, int TS, bool CELLS, bool WIDE = false, bool RLANES = false>
__device__ __forceinline__ void lr_score_tiles(const float2* __restrict__ vol,
                                               const float4* __restrict__ cells, int c, int rc,
                                               float padding, const float* __restrict__ rot,
                                               const float* __restrict__ rshift, int n,
                                               float sign, int m, int J,
                                               const float* __restrict__ kx,
                                               const float* __restrict__ ky,
                                               const float* __restrict__ w1,
                                               const float2* __restrict__ z, int S, int npix,
                                               float* __restrict__ out) {
    constexpr int NS = TS / 16;  // shifts per thread
    constexpr int NJ = TJ / 16;  // rotations per thread
    const int i = blockIdx.z;
    const int j0 = blockIdx.x * TJ;
    const int s0 = blockIdx.y * TS;
    if (i >= m || j0 >= J || s0 >= S) return;  // block-uniform guard

    constexpr int PAD = WIDE ? 2 : 1;  // row padding (float2): 16-byte rows when WIDE
    __shared__ float rot_s[TJ][8];  // rows 0, 1 of A and the rotation's origin
    __shared__ __align__(16) float2 p_s[LR_TP][TJ + PAD];
    __shared__ __align__(16) float2 z_s[LR_TP][TS + PAD];
    __shared__ float a_s[TJ];

    const int tx = threadIdx.x, ty = threadIdx.y;
    const int t = ty * 16 + tx;
    const int lane = t & 31, warp = t >> 5;  // 8 warps
    // this thread's row and column of the 16 x 16 output grid (see WIDE)
    const int row = WIDE ? (warp >> 1) * 4 + (lane >> 3) : ty;
    const int col = WIDE ? (warp & 1) * 8 + (lane & 7) : tx;

    for (int k = t; k < TJ * 6; k += LR_THREADS) {
        const int jj = k / 6, r = k - 6 * jj;
        rot_s[jj][r] = (j0 + jj < J) ? rot[((size_t)i * J + j0 + jj) * 9 + r] : 0.0f;
    }
    for (int k = t; k < TJ * 2; k += LR_THREADS) {
        const int jj = k >> 1, r = k & 1;
        rot_s[jj][6 + r] =
            (rshift && j0 + jj < J) ? rshift[((size_t)i * J + j0 + jj) * 2 + r] : 0.0f;
    }
    __syncthreads();

    const float* w1i = w1 + (size_t)i * npix;
    const float2* zi = z + (size_t)i * S * npix;
    float a_acc[TJ / 8];  // |P|^2 term of rotations warp + 8 k (RLANES: lane + 32 k)
#pragma unroll
    for (int k = 0; k < TJ / 8; ++k) a_acc[k] = 0.0f;
    float acc[NJ][NS];
#pragma unroll
    for (int h = 0; h < NJ; ++h)
#pragma unroll
        for (int q = 0; q < NS; ++q) acc[h][q] = 0.0f;

    for (int p0 = 0; p0 < npix; p0 += LR_TP) {
        // slice values: lane -> pixel (neighbouring pixels read neighbouring
        // voxels) or, RLANES, lane -> rotation (see above)
        const int p = p0 + lane;
        const bool pin = p < npix;
        const float kxp = pin ? kx[p] : 0.0f, kyp = pin ? ky[p] : 0.0f;
        const float w = pin ? w1i[p] : 0.0f;
#pragma unroll
        for (int k = 0; k < TJ / 8; ++k) {
            // RLANES: pixel warp + 8 (k % 4) of the step (its kx, ky, w1 from
            // the lane that loaded them), rotation lane + 32 (k / 4)
            const int pp = RLANES ? warp + 8 * (k & 3) : lane;
            const int jj = RLANES ? lane + 32 * (k >> 2) : warp + 8 * k;
            const float kxs = RLANES ? __shfl_sync(0xffffffffu, kxp, pp) : kxp;
            const float kys = RLANES ? __shfl_sync(0xffffffffu, kyp, pp) : kyp;
            const float ws = RLANES ? __shfl_sync(0xffffffffu, w, pp) : w;
            float2 v = make_float2(0.0f, 0.0f);
            if (p0 + pp < npix && j0 + jj < J) {
                float qx, qy, qz;
                lr_slice_point(rot_s[jj], kxs, kys, padding, &qx, &qy, &qz);
                v = CELLS ? lr_sample_cells(cells, c, rc, qx, qy, qz)
                          : lr_sample(vol, c, qx, qy, qz);
                if (rshift) {  // launch-uniform branch
                    float sn, cs;
                    sincospif(sign * 2.0f * (kxs * rot_s[jj][6] + kys * rot_s[jj][7]) / (float)n,
                              &sn, &cs);
                    v = make_float2(v.x * cs - v.y * sn, v.x * sn + v.y * cs);
                }
                a_acc[RLANES ? (k >> 2) : k] += ws * (v.x * v.x + v.y * v.y);
            }
            p_s[pp][jj] = v;
        }
        // phase-table tile: lane -> pixel (coalesced), warp + 8 k -> shift
#pragma unroll
        for (int k = 0; k < TS / 8; ++k) {
            const int ss = warp + 8 * k;
            z_s[lane][ss] = (pin && s0 + ss < S) ? zi[(size_t)(s0 + ss) * npix + p]
                                                 : make_float2(0.0f, 0.0f);
        }
        __syncthreads();
#pragma unroll 8
        for (int pp = 0; pp < LR_TP; ++pp) {
            float2 ph[NJ], zs[NS];
#pragma unroll
            for (int h = 0; h < NJ; ++h) {
                if (WIDE) {
                    if (h % 2 == 0) {
                        const float4 v = *reinterpret_cast<const float4*>(
                            &p_s[pp][lr_wide_index(row, h)]);
                        ph[h] = make_float2(v.x, v.y);
                        ph[h + 1] = make_float2(v.z, v.w);
                    }
                } else {
                    ph[h] = p_s[pp][row + 16 * h];
                }
            }
#pragma unroll
            for (int q = 0; q < NS; ++q) {
                if (WIDE) {
                    if (q % 2 == 0) {
                        const float4 v = *reinterpret_cast<const float4*>(
                            &z_s[pp][lr_wide_index(col, q)]);
                        zs[q] = make_float2(v.x, v.y);
                        zs[q + 1] = make_float2(v.z, v.w);
                    }
                } else {
                    zs[q] = z_s[pp][col + 16 * q];
                }
            }
#pragma unroll
            for (int q = 0; q < NS; ++q)
#pragma unroll
                for (int h = 0; h < NJ; ++h)
                    acc[h][q] += ph[h].x * zs[q].x - ph[h].y * zs[q].y;
        }
        __syncthreads();
    }
    if (RLANES) {
        // |P|^2 terms: rotation lane + 32 h summed over the pixels of each
        // warp; add the 8 warps' sums in order (p_s is free after the loop)
        float* part = reinterpret_cast<float*>(&p_s[0][0]);  // [8][TJ]
#pragma unroll
        for (int h = 0; h < TJ / 32; ++h) part[warp * TJ + lane + 32 * h] = a_acc[h];
        __syncthreads();
        if (t < TJ) {
            float v = 0.0f;
#pragma unroll
            for (int q = 0; q < 8; ++q) v += part[q * TJ + t];
            a_s[t] = v;
        }
    } else {
        // |P|^2 terms: reduce over the 32 pixels (lanes) of each warp
#pragma unroll
        for (int k = 0; k < TJ / 8; ++k) {
            float v = a_acc[k];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
            if (lane == 0) a_s[warp + 8 * k] = v;
        }
    }
    __syncthreads();
    float* outi = out + (size_t)i * J * S;
#pragma unroll
    for (int h = 0; h < NJ; ++h) {
        const int jj = WIDE ? lr_wide_index(row, h) : row + 16 * h;
        const int j = j0 + jj;
#pragma unroll
        for (int q = 0; q < NS; ++q) {
            const int s = s0 + (WIDE ? lr_wide_index(col, q) : col + 16 * q);
            if (j < J && s < S) outi[(size_t)j * S + s] = a_s[jj] - acc[h][q];
        }
    }
}

// Tiles of 32 shifts (host's choice when S <= 32).
extern "C" __global__ void __launch_bounds__(LR_THREADS)
score_tiles(const float2* __restrict__ vol, int c, float padding,
            const float* __restrict__ rot, const float* __restrict__ rshift, int n,
            float sign, int m, int J, const float* __restrict__ kx,
            const float* __restrict__ ky, const float* __restrict__ w1,
            const float2* __restrict__ z, int S, int npix, float* __restrict__ out) {
    if (blockIdx.z >= (unsigned)m) return;
    lr_score_tiles<32, 32, false>(vol, nullptr, c, 0, padding, rot, rshift, n, sign, m, J, kx, ky, w1, z, S, npix, out);
}

// Tiles of 64 shifts: each slice value serves twice as many shifts (S > 32).
extern "C" __global__ void __launch_bounds__(LR_THREADS, 2)
score_tiles_s64(const float2* __restrict__ vol, int c, float padding,
                const float* __restrict__ rot, const float* __restrict__ rshift, int n,
                float sign, int m, int J, const float* __restrict__ kx,
                const float* __restrict__ ky, const float* __restrict__ w1,
                const float2* __restrict__ z, int S, int npix, float* __restrict__ out) {
    if (blockIdx.z >= (unsigned)m) return;
    lr_score_tiles<32, 64, false>(vol, nullptr, c, 0, padding, rot, rshift, n, sign, m, J, kx, ky, w1, z, S, npix, out);
}

// Tiles of 64 rotations x 64 shifts (4 x 4 outputs per thread): each Z value
// serves twice as many rotations; fewer blocks (more registers per thread).
extern "C" __global__ void __launch_bounds__(LR_THREADS, 1)
score_tiles_j64_s64(const float2* __restrict__ vol, int c, float padding,
                    const float* __restrict__ rot, const float* __restrict__ rshift, int n,
                    float sign, int m, int J, const float* __restrict__ kx,
                    const float* __restrict__ ky, const float* __restrict__ w1,
                    const float2* __restrict__ z, int S, int npix, float* __restrict__ out) {
    if (blockIdx.z >= (unsigned)m) return;
    lr_score_tiles<64, 64, false>(vol, nullptr, c, 0, padding, rot, rshift, n, sign, m, J, kx, ky, w1, z, S, npix,
                           out);
}

// The s64 and j64_s64 tiles reading the slices from the cells of radius rc
// (lr_sample_cells): same scores, 2 aligned sectors per sample instead of the
// 8 scattered corners. cells: from build_cells (projector.cu).
extern "C" __global__ void __launch_bounds__(LR_THREADS, 2)
score_tiles_s64_cells(const float4* __restrict__ cells, int c, int rc, float padding,
                      const float* __restrict__ rot, const float* __restrict__ rshift, int n,
                      float sign, int m, int J, const float* __restrict__ kx,
                      const float* __restrict__ ky, const float* __restrict__ w1,
                      const float2* __restrict__ z, int S, int npix, float* __restrict__ out) {
    if (blockIdx.z >= (unsigned)m) return;
    lr_score_tiles<32, 64, true>(nullptr, cells, c, rc, padding, rot, rshift, n, sign, m, J, kx,
                                 ky, w1, z, S, npix, out);
}

extern "C" __global__ void __launch_bounds__(LR_THREADS, 1)
score_tiles_j64_s64_cells(const float4* __restrict__ cells, int c, int rc, float padding,
                          const float* __restrict__ rot, const float* __restrict__ rshift,
                          int n, float sign, int m, int J, const float* __restrict__ kx,
                          const float* __restrict__ ky, const float* __restrict__ w1,
                          const float2* __restrict__ z, int S, int npix,
                          float* __restrict__ out) {
    if (blockIdx.z >= (unsigned)m) return;
    lr_score_tiles<64, 64, true>(nullptr, cells, c, rc, padding, rot, rshift, n, sign, m, J,
                                 kx, ky, w1, z, S, npix, out);
}

// The s64, j64_s64 and j64_s64_cells tiles with the WIDE mapping (16-byte
// shared-memory reads, 4 x 8 threads per warp); measured by bench_gpu.py.
extern "C" __global__ void __launch_bounds__(LR_THREADS, 2)
score_tiles_s64_wide(const float2* __restrict__ vol, int c, float padding,
                     const float* __restrict__ rot, const float* __restrict__ rshift, int n,
                     float sign, int m, int J, const float* __restrict__ kx,
                     const float* __restrict__ ky, const float* __restrict__ w1,
                     const float2* __restrict__ z, int S, int npix, float* __restrict__ out) {
    if (blockIdx.z >= (unsigned)m) return;
    lr_score_tiles<32, 64, false, true>(vol, nullptr, c, 0, padding, rot, rshift, n, sign, m,
                                        J, kx, ky, w1, z, S, npix, out);
}

extern "C" __global__ void __launch_bounds__(LR_THREADS, 1)
score_tiles_j64_s64_wide(const float2* __restrict__ vol, int c, float padding,
                         const float* __restrict__ rot, const float* __restrict__ rshift, int n,
                         float sign, int m, int J, const float* __restrict__ kx,
                         const float* __restrict__ ky, const float* __restrict__ w1,
                         const float2* __restrict__ z, int S, int npix, float* __restrict__ out) {
    if (blockIdx.z >= (unsigned)m) return;
    lr_score_tiles<64, 64, false, true>(vol, nullptr, c, 0, padding, rot, rshift, n, sign, m,
                                        J, kx, ky, w1, z, S, npix, out);
}

extern "C" __global__ void __launch_bounds__(LR_THREADS, 1)
score_tiles_j64_s64_cells_wide(const float4* __restrict__ cells, int c, int rc, float padding,
                               const float* __restrict__ rot, const float* __restrict__ rshift,
                               int n, float sign, int m, int J, const float* __restrict__ kx,
                               const float* __restrict__ ky, const float* __restrict__ w1,
                               const float2* __restrict__ z, int S, int npix,
                               float* __restrict__ out) {
    if (blockIdx.z >= (unsigned)m) return;
    lr_score_tiles<64, 64, true, true>(nullptr, cells, c, rc, padding, rot, rshift, n, sign, m,
                                       J, kx, ky, w1, z, S, npix, out);
}

// The s64 tiles with at least 4 blocks per SM (__launch_bounds__ minimum 4:
// ptxas keeps them in 64 registers without spills, against 104 for s64's
// minimum 2): twice the resident warps to hide the latency of the slice
// gathers, at the cost of fewer loads in flight per thread. Which wins is
// measured by benchmarks/bench_gpu.py.
extern "C" __global__ void __launch_bounds__(LR_THREADS, 4)
score_tiles_s64_occ4(const float2* __restrict__ vol, int c, float padding,
                     const float* __restrict__ rot, const float* __restrict__ rshift, int n,
                     float sign, int m, int J, const float* __restrict__ kx,
                     const float* __restrict__ ky, const float* __restrict__ w1,
                     const float2* __restrict__ z, int S, int npix, float* __restrict__ out) {
    if (blockIdx.z >= (unsigned)m) return;
    lr_score_tiles<32, 64, false>(vol, nullptr, c, 0, padding, rot, rshift, n, sign, m, J, kx,
                                  ky, w1, z, S, npix, out);
}

extern "C" __global__ void __launch_bounds__(LR_THREADS, 4)
score_tiles_s64_cells_occ4(const float4* __restrict__ cells, int c, int rc, float padding,
                           const float* __restrict__ rot, const float* __restrict__ rshift,
                           int n, float sign, int m, int J, const float* __restrict__ kx,
                           const float* __restrict__ ky, const float* __restrict__ w1,
                           const float2* __restrict__ z, int S, int npix,
                           float* __restrict__ out) {
    if (blockIdx.z >= (unsigned)m) return;
    lr_score_tiles<32, 64, true>(nullptr, cells, c, rc, padding, rot, rshift, n, sign, m, J,
                                 kx, ky, w1, z, S, npix, out);
}

// The s32, s64, j64_s64, s64_cells and s64_wide tiles with rotation lanes
// (RLANES: lane -> rotation while the slices are interpolated);
// $LOCALREFINE_SCORE_LANES=rotations selects them in the search
// (cuda_scoring.variant_for); measured by bench_gpu.py.
extern "C" __global__ void __launch_bounds__(LR_THREADS)
score_tiles_rl(const float2* __restrict__ vol, int c, float padding,
               const float* __restrict__ rot, const float* __restrict__ rshift, int n,
               float sign, int m, int J, const float* __restrict__ kx,
               const float* __restrict__ ky, const float* __restrict__ w1,
               const float2* __restrict__ z, int S, int npix, float* __restrict__ out) {
    if (blockIdx.z >= (unsigned)m) return;
    lr_score_tiles<32, 32, false, false, true>(vol, nullptr, c, 0, padding, rot, rshift, n,
                                               sign, m, J, kx, ky, w1, z, S, npix, out);
}

extern "C" __global__ void __launch_bounds__(LR_THREADS, 2)
score_tiles_s64_rl(const float2* __restrict__ vol, int c, float padding,
                   const float* __restrict__ rot, const float* __restrict__ rshift, int n,
                   float sign, int m, int J, const float* __restrict__ kx,
                   const float* __restrict__ ky, const float* __restrict__ w1,
                   const float2* __restrict__ z, int S, int npix, float* __restrict__ out) {
    if (blockIdx.z >= (unsigned)m) return;
    lr_score_tiles<32, 64, false, false, true>(vol, nullptr, c, 0, padding, rot, rshift, n,
                                               sign, m, J, kx, ky, w1, z, S, npix, out);
}

extern "C" __global__ void __launch_bounds__(LR_THREADS, 1)
score_tiles_j64_s64_rl(const float2* __restrict__ vol, int c, float padding,
                       const float* __restrict__ rot, const float* __restrict__ rshift,
                       int n, float sign, int m, int J, const float* __restrict__ kx,
                       const float* __restrict__ ky, const float* __restrict__ w1,
                       const float2* __restrict__ z, int S, int npix,
                       float* __restrict__ out) {
    if (blockIdx.z >= (unsigned)m) return;
    lr_score_tiles<64, 64, false, false, true>(vol, nullptr, c, 0, padding, rot, rshift, n,
                                               sign, m, J, kx, ky, w1, z, S, npix, out);
}

extern "C" __global__ void __launch_bounds__(LR_THREADS, 2)
score_tiles_s64_cells_rl(const float4* __restrict__ cells, int c, int rc, float padding,
                         const float* __restrict__ rot, const float* __restrict__ rshift,
                         int n, float sign, int m, int J, const float* __restrict__ kx,
                         const float* __restrict__ ky, const float* __restrict__ w1,
                         const float2* __restrict__ z, int S, int npix,
                         float* __restrict__ out) {
    if (blockIdx.z >= (unsigned)m) return;
    lr_score_tiles<32, 64, true, false, true>(nullptr, cells, c, rc, padding, rot, rshift, n,
                                              sign, m, J, kx, ky, w1, z, S, npix, out);
}

extern "C" __global__ void __launch_bounds__(LR_THREADS, 2)
score_tiles_s64_wide_rl(const float2* __restrict__ vol, int c, float padding,
                        const float* __restrict__ rot, const float* __restrict__ rshift,
                        int n, float sign, int m, int J, const float* __restrict__ kx,
                        const float* __restrict__ ky, const float* __restrict__ w1,
                        const float2* __restrict__ z, int S, int npix,
                        float* __restrict__ out) {
    if (blockIdx.z >= (unsigned)m) return;
    lr_score_tiles<32, 64, false, true, true>(vol, nullptr, c, 0, padding, rot, rshift, n,
                                              sign, m, J, kx, ky, w1, z, S, npix, out);
}

// 32-shift tiles with the WIDE mapping (the product's shared-memory reads
// halved: at S <= 32 the plain s32 tile issues 4 loads per pixel for 8 FMAs
// per thread), without and with rotation lanes; $LOCALREFINE_SCORE_WIDE=1
// selects the _wide variants in the search (cuda_scoring.variant_for).
extern "C" __global__ void __launch_bounds__(LR_THREADS)
score_tiles_wide(const float2* __restrict__ vol, int c, float padding,
                 const float* __restrict__ rot, const float* __restrict__ rshift, int n,
                 float sign, int m, int J, const float* __restrict__ kx,
                 const float* __restrict__ ky, const float* __restrict__ w1,
                 const float2* __restrict__ z, int S, int npix, float* __restrict__ out) {
    if (blockIdx.z >= (unsigned)m) return;
    lr_score_tiles<32, 32, false, true, false>(vol, nullptr, c, 0, padding, rot, rshift, n,
                                               sign, m, J, kx, ky, w1, z, S, npix, out);
}

extern "C" __global__ void __launch_bounds__(LR_THREADS)
score_tiles_wide_rl(const float2* __restrict__ vol, int c, float padding,
                    const float* __restrict__ rot, const float* __restrict__ rshift, int n,
                    float sign, int m, int J, const float* __restrict__ kx,
                    const float* __restrict__ ky, const float* __restrict__ w1,
                    const float2* __restrict__ z, int S, int npix, float* __restrict__ out) {
    if (blockIdx.z >= (unsigned)m) return;
    lr_score_tiles<32, 32, false, true, true>(vol, nullptr, c, 0, padding, rot, rshift, n,
                                              sign, m, J, kx, ky, w1, z, S, npix, out);
}
