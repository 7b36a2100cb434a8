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
    const float wi = img_w ? img_w[i] : 1.0f;
    const float cf = ctf ? ctf[img * ctf_stride + src[p]] : 1.0f;
    float2 fv = f[img * img_stride + src[p]];
    if (shift) {  // launch-uniform branch
        float sn, cs;
        sincospif(-2.0f * (kxp * shift[2 * i] + kyp * shift[2 * i + 1]) / (float)n, &sn, &cs);
        fv = make_float2(fv.x * cs - fv.y * sn, fv.x * sn + fv.y * cs);
    }
    const float vr = cf * wi * fv.x;
    const float vi = (k.conj ? -1.0f : 1.0f) * cf * wi * fv.y;
    const float vw = cf * cf * wi;
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
