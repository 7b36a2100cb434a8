// Back-projection (insertion) of particle images into the padded Fourier
// accumulators, trilinear, with atomics. Conventions: localrefine_common.h.
// Loaded by cuda_backprojector.py with no_extern_c=True.
//
// For image i and pixel p inside the insertion radius, at q = padding *
// A_i^T (kx_p, ky_p, 0):
//   data   += t_c * ctf_ip * w_i * F_ip   (conjugated where q was mirrored)
//   weight += t_c * ctf_ip^2 * w_i
// over the 8 trilinear corners c with weights t_c (engine BackProjector.insert).
// Insertion i may read image img_of[i] (the search's resident batch, several
// poses per image) and shift it first by (dx, dy) = shift[i] pixels: F times
// exp(-2 pi i (kx dx + ky dy) / N) (engine fourier.shift_images_fourier).
// The accumulators have the padded layout (2c+2, 2c+2, c+2) of the projector,
// either as two arrays (data interleaved (re, im), weight; float32 or float64)
// or as one float4 array (re, im, weight, unused) per voxel ("float32x4"):
// one 16-byte vector atomic per corner on sm_90 (three scalar ones before),
// all three sums of a corner in one 32-byte sector.
#include "localrefine_common.h"

// Accumulators of the two layouts: add(e, vr, vi, vw) adds to voxel e.
template <typename T>
struct LrSplitAcc {  // data (2 size,) interleaved (re, im), weight (size,)
    T* data;
    T* weight;
    __device__ __forceinline__ void add(size_t e, float vr, float vi, float vw) const {
        atomicAdd(&data[2 * e], (T)vr);
        atomicAdd(&data[2 * e + 1], (T)vi);
        atomicAdd(&weight[e], (T)vw);
    }
};

struct LrFloat4Acc {  // (size,) float4 (re, im, weight, unused)
    float4* acc;
    __device__ __forceinline__ void add(size_t e, float vr, float vi, float vw) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        atomicAdd(acc + e, make_float4(vr, vi, vw, 0.0f));  // one vector atomic
#else
        atomicAdd(&acc[e].x, vr);
        atomicAdd(&acc[e].y, vi);
        atomicAdd(&acc[e].z, vw);
#endif
    }
};

// What one insertion adds at a pixel, before the trilinear weights: (data re,
// data im, weight) = (ctf w F, ctf w F (conjugated when q was mirrored),
// ctf^2 w) of image img at flat index flat of the (N, N/2+1) layout, F
// shifted first by sh[0], sh[1] pixels when sh is given (frequencies kx, ky).
// Shared by the scatter (lr_insert) and the gather (backproject_gather_f32).
__device__ __forceinline__ float3 lr_insert_value(const float2* __restrict__ f, int img_stride,
                                                  const float* __restrict__ ctf,
                                                  int ctf_stride, size_t img, int flat,
                                                  float wi, const float* sh, float kx,
                                                  float ky, int n, bool conj) {
    const float cf = ctf ? ctf[img * ctf_stride + flat] : 1.0f;
    float2 fv = f[img * img_stride + flat];
    if (sh) {  // launch-uniform branch
        float sn, cs;
        sincospif(-2.0f * (kx * sh[0] + ky * sh[1]) / (float)n, &sn, &cs);
        fv = make_float2(fv.x * cs - fv.y * sn, fv.x * sn + fv.y * cs);
    }
    return make_float3(cf * wi * fv.x, (conj ? -1.0f : 1.0f) * cf * wi * fv.y, cf * cf * wi);
}

// One thread per (pixel p, insertion i): the pixel's three values into its 8 corners.
template <typename Acc>
__device__ __forceinline__ void lr_insert(const float2* __restrict__ f,
                                          const float* __restrict__ ctf, int ctf_stride,
                                          const float* __restrict__ img_w,
                                          const int* __restrict__ img_of,
                                          const float* __restrict__ shift, int n,
                                          const float* __restrict__ rot, int m,
                                          const float* __restrict__ kx,
                                          const float* __restrict__ ky,
                                          const int* __restrict__ src, int npix,
                                          int img_stride, int c, float padding,
                                          const Acc& acc) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    const int i = blockIdx.y;
    if (p >= npix || i >= m) return;
    const float kxp = kx[p], kyp = ky[p];
    float qx, qy, qz;  // rows 0 and 1 of A (the row's first 6 entries): all the slice needs
    lr_slice_point(rot + 9 * i, kxp, kyp, padding, &qx, &qy, &qz);
    LrCorners k;
    lr_corners(qx, qy, qz, c, false, &k);
    const size_t img = img_of ? (size_t)img_of[i] : (size_t)i;
    const float3 v = lr_insert_value(f, img_stride, ctf, ctf_stride, img, src[p],
                                     img_w ? img_w[i] : 1.0f, shift ? shift + 2 * i : nullptr,
                                     kxp, kyp, n, k.conj);
    const float vr = v.x, vi = v.y, vw = v.z;
    float t[8];
    int o[8];
    lr_trilinear_weights(k, t);
    lr_corner_offsets(k, o);
#pragma unroll
    for (int j = 0; j < 8; ++j) acc.add((size_t)k.base + o[j], t[j] * vr, t[j] * vi, t[j] * vw);
}

// grid: (ceil(npix / blockDim.x), m); one thread per (pixel, insertion).
// f: (images, img_stride) complex image transforms; ctf: (images, ctf_stride)
// (ctf_stride 0: one CTF for all) or NULL; img_w: (m,) or NULL; img_of: (m,)
// image of each insertion, or NULL (insertion i reads image i); shift: (m, 2)
// pixels, or NULL (no shift); n: box size; rot: (m, 9); kx, ky, src: (npix,)
// pixel frequencies and flat indices in the (N, N/2+1) layout.
extern "C" __global__ void backproject_f32(const float2* __restrict__ f,
                                           const float* __restrict__ ctf, int ctf_stride,
                                           const float* __restrict__ img_w,
                                           const int* __restrict__ img_of,
                                           const float* __restrict__ shift, int n,
                                           const float* __restrict__ rot, int m,
                                           const float* __restrict__ kx,
                                           const float* __restrict__ ky,
                                           const int* __restrict__ src, int npix,
                                           int img_stride, int c, float padding,
                                           float* __restrict__ data, float* __restrict__ weight) {
    if (blockIdx.y >= (unsigned)m) return;
    lr_insert(f, ctf, ctf_stride, img_w, img_of, shift, n, rot, m, kx, ky, src, npix,
              img_stride, c, padding,
              LrSplitAcc<float>{data, weight});
}

extern "C" __global__ void backproject_f64(const float2* __restrict__ f,
                                           const float* __restrict__ ctf, int ctf_stride,
                                           const float* __restrict__ img_w,
                                           const int* __restrict__ img_of,
                                           const float* __restrict__ shift, int n,
                                           const float* __restrict__ rot, int m,
                                           const float* __restrict__ kx,
                                           const float* __restrict__ ky,
                                           const int* __restrict__ src, int npix,
                                           int img_stride, int c, float padding,
                                           double* __restrict__ data, double* __restrict__ weight) {
    if (blockIdx.y >= (unsigned)m) return;
    lr_insert(f, ctf, ctf_stride, img_w, img_of, shift, n, rot, m, kx, ky, src, npix,
              img_stride, c, padding,
              LrSplitAcc<double>{data, weight});
}

// As backproject_f32 into one float4 accumulator per voxel: acc (size,) of
// (re, im, weight, unused).
extern "C" __global__ void backproject_f32x4(const float2* __restrict__ f,
                                             const float* __restrict__ ctf, int ctf_stride,
                                             const float* __restrict__ img_w,
                                             const int* __restrict__ img_of,
                                             const float* __restrict__ shift, int n,
                                             const float* __restrict__ rot, int m,
                                             const float* __restrict__ kx,
                                             const float* __restrict__ ky,
                                             const int* __restrict__ src, int npix,
                                             int img_stride, int c, float padding,
                                             float4* __restrict__ acc) {
    if (blockIdx.y >= (unsigned)m) return;
    lr_insert(f, ctf, ctf_stride, img_w, img_of, shift, n, rot, m, kx, ky, src, npix,
              img_stride, c, padding,
              LrFloat4Acc{acc});
}

// Gather scheme (for comparison with the atomics; cuda_backprojector.py,
// scheme="gather"): one thread per voxel of the padded layout within rv of
// the origin (rv >= padding r_max + sqrt(3): every corner the scatter
// reaches), summing, over the m insertions, what the scatter kernels above
// add into that voxel, and adding it once (no atomics: each voxel has one
// thread).
// A voxel v is a corner of a pixel's point q only if |q - v| < sqrt(3), so
// only insertions whose plane passes within sqrt(3) of v (out-of-plane
// coordinate (A v)_z) can reach it, and only the pixels whose in-plane
// coordinates padding k lie within sqrt(3) of (A v)_xy (mirrored points: of
// -(A v)_xy): at most 2 x 2 candidates per side at padding 2. Each candidate
// is checked exactly as the scatter computes it (lr_slice_point,
// lr_corners, and the weights as lr_trilinear_weights forms them: the same q,
// mirroring, corners and weights), so every (pixel, corner) pair is counted
// once, as there; only the order of the sums differs.
// pix: (N, N/2+1) the index in the insertion list (kx, ky: the scatter's
// frequencies) of each half-plane pixel, -1 for those not inserted; a candidate
// (kx, ky) counts only where the list holds exactly those frequencies (the
// Nyquist row of an even box is one pixel, listed with ky = -N/2); other
// arguments as lr_insert's; data, weight: float32 split accumulators.
#define LR_GATHER_CHUNK 64
extern "C" __global__ void backproject_gather_f32(
    const float2* __restrict__ f, const float* __restrict__ ctf, int ctf_stride,
    const float* __restrict__ img_w, const int* __restrict__ img_of,
    const float* __restrict__ shift, int n, const float* __restrict__ rot, int m,
    const float* __restrict__ kx_tab, const float* __restrict__ ky_tab,
    const int* __restrict__ pix, int img_stride, int c, float padding, int rv,
    float* __restrict__ data, float* __restrict__ weight) {
    const int nx = rv + 1, ny = 2 * rv + 1;
    const long long nvox = (long long)nx * ny * ny;
    // block-uniform guard (the blocks synchronise below); threads past the
    // end of the last block only help load the shared tables
    if ((long long)blockIdx.x * blockDim.x >= nvox) return;
    __shared__ float rot_s[LR_GATHER_CHUNK][9];
    __shared__ float aux_s[LR_GATHER_CHUNK][3];  // weight, shift x, shift y
    __shared__ int img_s[LR_GATHER_CHUNK];
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    // voxel (x, y, z) of the padded frequency grid, x = 0..rv, y, z = -rv..rv
    const int x = (int)(t % nx);
    const int y = (int)((t / nx) % ny) - rv;
    const int z = (int)(t / ((long long)nx * ny)) - rv;
    // inside the ball of radius rv and the array (y, z index 0 .. 2c+1)
    const bool mine = t < nvox && x * x + y * y + z * z <= rv * rv && x <= c + 1 &&
                      y >= -c && y <= c + 1 && z >= -c && z <= c + 1;
    const float vx = (float)x, vy = (float)y, vz = (float)z;
    const int sy = c + 2, sz = (c + 2) * (2 * c + 2);
    const int half = n / 2 + 1;
    const float reach = 1.7320509f * 1.0001f;  // sqrt(3), a little wider
    float ar = 0.0f, ai = 0.0f, aw = 0.0f;
    for (int i0 = 0; i0 < m; i0 += LR_GATHER_CHUNK) {
        const int cnt = min(LR_GATHER_CHUNK, m - i0);
        __syncthreads();  // the previous chunk is read by everyone
        for (int k = threadIdx.x; k < cnt * 9; k += blockDim.x)
            rot_s[k / 9][k % 9] = rot[(size_t)i0 * 9 + k];
        for (int k = threadIdx.x; k < cnt; k += blockDim.x) {
            aux_s[k][0] = img_w ? img_w[i0 + k] : 1.0f;
            aux_s[k][1] = shift ? shift[2 * (i0 + k)] : 0.0f;
            aux_s[k][2] = shift ? shift[2 * (i0 + k) + 1] : 0.0f;
            img_s[k] = img_of ? img_of[i0 + k] : i0 + k;
        }
        __syncthreads();
        if (!mine) continue;
        for (int ii = 0; ii < cnt; ++ii) {
            const float* a = rot_s[ii];
            const float d = a[6] * vx + a[7] * vy + a[8] * vz;  // out of the plane
            if (fabsf(d) >= reach) continue;
            const float u0 = (a[0] * vx + a[1] * vy + a[2] * vz) / padding;
            const float u1 = (a[3] * vx + a[4] * vy + a[5] * vz) / padding;
            const float h = reach / padding;
            const size_t img = (size_t)img_s[ii];
            for (int side = 0; side < 2; ++side) {  // 0: q near v; 1: -q near v
                const float cx = side ? -u0 : u0, cy = side ? -u1 : u1;
                const int kx0 = max((int)ceilf(cx - h), 0);
                const int kx1 = min((int)floorf(cx + h), n / 2);
                const int ky0 = max((int)ceilf(cy - h), -(n / 2));
                const int ky1 = min((int)floorf(cy + h), n / 2);
                for (int kx = kx0; kx <= kx1; ++kx) {
                    for (int ky = ky0; ky <= ky1; ++ky) {
                        const int flat = (ky >= 0 ? ky : ky + n) * half + kx;
                        const int p = pix[flat];
                        if (p < 0 || kx_tab[p] != (float)kx || ky_tab[p] != (float)ky) continue;
                        float qx, qy, qz;
                        lr_slice_point(a, (float)kx, (float)ky, padding, &qx, &qy, &qz);
                        LrCorners k;
                        lr_corners(qx, qy, qz, c, false, &k);
                        if (k.conj != (side == 1)) continue;
                        const int bz = k.base / sz, rem = k.base - bz * sz;
                        const int by = rem / sy, bx = rem - by * sy;
                        const int dx = x - bx, dy = y + c - by, dz = z + c - bz;
                        if (dx < 0 || dx > 1 || dy < 0 || dy > 1 || dz < 0 || dz > 1)
                            continue;
                        // the corner's weight as lr_trilinear_weights forms it (z, y, x)
                        const float tc = ((dz ? k.fz : 1.0f - k.fz) * (dy ? k.fy : 1.0f - k.fy)) *
                                         (dx ? k.fx : 1.0f - k.fx);
                        const float3 v = lr_insert_value(
                            f, img_stride, ctf, ctf_stride, img, flat, aux_s[ii][0],
                            shift ? &aux_s[ii][1] : nullptr, (float)kx, (float)ky, n, k.conj);
                        ar += tc * v.x;
                        ai += tc * v.y;
                        aw += tc * v.z;
                    }
                }
            }
        }
    }
    if (mine && (ar != 0.0f || ai != 0.0f || aw != 0.0f)) {
        const size_t e = (size_t)(z + c) * sz + (size_t)(y + c) * sy + x;
        data[2 * e] += ar;
        data[2 * e + 1] += ai;
        weight[e] += aw;
    }
}
