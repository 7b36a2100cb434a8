// Central-slice extraction from the padded Fourier volume (trilinear, plain loads).
// Conventions: localrefine_common.h. Loaded by cuda_projector.py with
// no_extern_c=True (the entry points below declare extern "C" themselves).
#include "localrefine_common.h"

// out[i, dest[p]] = trilinear value at padding * A_i^T (kx_p, ky_p, 0).
//
// grid: (ceil(npix / blockDim.x), m); one thread per (pixel, image).
// vol: padded volume (2c+2, 2c+2, c+2) complex; rot: (m, 9) row-major A;
// kx, ky: (npix,) image frequencies (cycles per box); dest: (npix,) flat
// index of each pixel in the (N, N/2+1) image layout; out: (m, out_stride)
// complex, pre-zeroed.
extern "C" __global__ void project_slices(const float2* __restrict__ vol, int c, float padding,
                                          const float* __restrict__ rot, int m,
                                          const float* __restrict__ kx,
                                          const float* __restrict__ ky,
                                          const int* __restrict__ dest, int npix,
                                          float2* __restrict__ out, int out_stride) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    const int i = blockIdx.y;
    if (p >= npix || i >= m) return;
    float qx, qy, qz;  // rows 0 and 1 of A (the row's first 6 entries): all the slice needs
    lr_slice_point(rot + 9 * i, kx[p], ky[p], padding, &qx, &qy, &qz);
    out[(size_t)i * out_stride + dest[p]] = lr_sample(vol, c, qx, qy, qz);
}
