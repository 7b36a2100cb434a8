// Back-projection (insertion) of particle images into the padded Fourier
// accumulators, trilinear, with atomics. Conventions: localrefine_common.h.
// Loaded by cuda_backprojector.py with no_extern_c=True.
//
// For image i and pixel p inside the insertion radius, at q = padding *
// A_i^T (kx_p, ky_p, 0):
//   data   += t_c * ctf_ip * w_i * F_ip   (conjugated where q was mirrored)
//   weight += t_c * ctf_ip^2 * w_i
// over the 8 trilinear corners c with weights t_c (engine BackProjector.insert).
// The accumulators have the padded layout (2c+2, 2c+2, c+2) of the projector;
// data is stored as interleaved (re, im).
#include "localrefine_common.h"

template <typename T>
__device__ __forceinline__ void lr_insert(const float2* __restrict__ f,
                                          const float* __restrict__ ctf,
                                          const float* __restrict__ img_w,
                                          const float* __restrict__ rot, int m,
                                          const float* __restrict__ kx,
                                          const float* __restrict__ ky,
                                          const int* __restrict__ src, int npix,
                                          int img_stride, int c, float padding,
                                          T* __restrict__ data, T* __restrict__ weight) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    const int i = blockIdx.y;
    if (p >= npix || i >= m) return;
    float qx, qy, qz;  // rows 0 and 1 of A (the row's first 6 entries): all the slice needs
    lr_slice_point(rot + 9 * i, kx[p], ky[p], padding, &qx, &qy, &qz);
    LrCorners k;
    lr_corners(qx, qy, qz, c, false, &k);
    const size_t at = (size_t)i * img_stride + src[p];
    const float wi = img_w ? img_w[i] : 1.0f;
    const float cf = ctf ? ctf[at] : 1.0f;
    const float2 fv = f[at];
    const float vr = cf * wi * fv.x;
    const float vi = (k.conj ? -1.0f : 1.0f) * cf * wi * fv.y;
    const float vw = cf * cf * wi;
    const float gx = 1.0f - k.fx, gy = 1.0f - k.fy, gz = 1.0f - k.fz;
    const float t[8] = {gz * gy * gx, gz * gy * k.fx, gz * k.fy * gx, gz * k.fy * k.fx,
                        k.fz * gy * gx, k.fz * gy * k.fx, k.fz * k.fy * gx, k.fz * k.fy * k.fx};
    const int o[8] = {0, 1, k.sy, k.sy + 1, k.sz, k.sz + 1, k.sz + k.sy, k.sz + k.sy + 1};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const size_t e = (size_t)k.base + o[j];
        atomicAdd(&data[2 * e], (T)(t[j] * vr));
        atomicAdd(&data[2 * e + 1], (T)(t[j] * vi));
        atomicAdd(&weight[e], (T)(t[j] * vw));
    }
}

// grid: (ceil(npix / blockDim.x), m); one thread per (pixel, image).
// f: (m, img_stride) complex image transforms; ctf: (m, img_stride) or NULL;
// img_w: (m,) or NULL; rot: (m, 9); kx, ky, src: (npix,) pixel frequencies
// and flat indices in the (N, N/2+1) layout.
extern "C" __global__ void backproject_f32(const float2* __restrict__ f,
                                           const float* __restrict__ ctf,
                                           const float* __restrict__ img_w,
                                           const float* __restrict__ rot, int m,
                                           const float* __restrict__ kx,
                                           const float* __restrict__ ky,
                                           const int* __restrict__ src, int npix,
                                           int img_stride, int c, float padding,
                                           float* __restrict__ data, float* __restrict__ weight) {
    if (blockIdx.y >= (unsigned)m) return;
    lr_insert<float>(f, ctf, img_w, rot, m, kx, ky, src, npix, img_stride, c, padding, data,
                     weight);
}

extern "C" __global__ void backproject_f64(const float2* __restrict__ f,
                                           const float* __restrict__ ctf,
                                           const float* __restrict__ img_w,
                                           const float* __restrict__ rot, int m,
                                           const float* __restrict__ kx,
                                           const float* __restrict__ ky,
                                           const int* __restrict__ src, int npix,
                                           int img_stride, int c, float padding,
                                           double* __restrict__ data, double* __restrict__ weight) {
    if (blockIdx.y >= (unsigned)m) return;
    lr_insert<double>(f, ctf, img_w, rot, m, kx, ky, src, npix, img_stride, c, padding, data,
                      weight);
}
