// Per-batch preparation for the local search on the device (cuda_search_ops.py):
// the scoring weights folded from the images, and the bound's projection power.
// Conventions: localrefine_common.h; the weights are those of scoring.cu:
//   w1[i, p] = 0.5 * mult_p * ctf_ip^2 / sigma2_i(shell_p)
//   Y[i, p]  = mult_p * ctf_ip / sigma2_i(shell_p) * conj(X_ip)
// over a list of pixels p (flat index into the (N, N/2+1) image, multiplicity,
// shell), here sorted by radius so that any smaller radius is a prefix.
// Loaded with no_extern_c=True.
#include "localrefine_common.h"

// Weights of particles first .. first+m-1 of the uploaded batch, pixels 0..npix-1.
// grid: (ceil(npix / blockDim.x), m). images: (batch, image_size) complex;
// ctf: (batch, image_size), or one shared image when ctf_stride = 0;
// inv_sigma2: (batch, n_shells), or shared when sigma_stride = 0;
// w1: (m, npix); y: (m, npix) complex.
extern "C" __global__ void fold_weights(const float2* __restrict__ images,
                                        const float* __restrict__ ctf, int ctf_stride,
                                        const float* __restrict__ inv_sigma2, int sigma_stride,
                                        const int* __restrict__ flat,
                                        const float* __restrict__ mult,
                                        const int* __restrict__ shell, int first, int m,
                                        int npix, int image_size, float* __restrict__ w1,
                                        float2* __restrict__ y) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    const int i = blockIdx.y;
    if (p >= npix || i >= m) return;
    const size_t particle = (size_t)(first + i);
    const int f = flat[p];
    const float c = ctf[particle * ctf_stride + f];
    const float w = mult[p] * inv_sigma2[particle * sigma_stride + shell[p]];
    const float2 x = images[particle * image_size + f];
    const size_t o = (size_t)i * npix + p;
    w1[o] = 0.5f * w * c * c;
    y[o] = make_float2(w * c * x.x, -w * c * x.y);
}

// power[i, p] = 2 * w1[i, p] * |P_i(p)|^2 = mult c^2 |P|^2 / sigma2 with P_i the
// central slice of rotation i (engine.scoring.weighted_projection_power).
// grid: (ceil(npix / blockDim.x), m); rot: (m, 9) row-major A.
extern "C" __global__ void projection_power(const float2* __restrict__ vol, int c,
                                            float padding, const float* __restrict__ rot,
                                            int m, const float* __restrict__ kx,
                                            const float* __restrict__ ky,
                                            const float* __restrict__ w1, int npix,
                                            float* __restrict__ power) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    const int i = blockIdx.y;
    if (p >= npix || i >= m) return;
    float a[6];
#pragma unroll
    for (int r = 0; r < 6; ++r) a[r] = rot[9 * i + r];
    float qx, qy, qz;
    lr_slice_point(a, kx[p], ky[p], padding, &qx, &qy, &qz);
    const float2 v = lr_sample(vol, c, qx, qy, qz);
    const size_t o = (size_t)i * npix + p;
    power[o] = 2.0f * w1[o] * (v.x * v.x + v.y * v.y);
}
