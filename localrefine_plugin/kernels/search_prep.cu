// Per-batch preparation for the local search on the device (cuda_search_ops.py):
// the scoring weights folded from the images, the bound's projection power and
// its weighted sums, and the candidate rotations about the fulcrum.
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
    float qx, qy, qz;  // rows 0 and 1 of A (the row's first 6 entries): all the slice needs
    lr_slice_point(rot + 9 * i, kx[p], ky[p], padding, &qx, &qy, &qz);
    const float2 v = lr_sample(vol, c, qx, qy, qz);
    const size_t o = (size_t)i * npix + p;
    power[o] = 2.0f * w1[o] * (v.x * v.x + v.y * v.y);
}

// Weighted sums of the bound's power over the pixels, in double:
//   out[i, w] = sum_p (double)power[i, p] * weights[w, p]
// (the search needs only such sums: the high-band power and the cell margin,
// engine/search.py). power: (m, npix) from projection_power; weights:
// (n_weights, npix); out: (m, n_weights). grid: (m, n_weights); blockDim.x
// must be POWER_SUM_THREADS. Each thread sums a strided subset of the pixels,
// then the block adds the partial sums as a tree (a fixed order: the same
// result every run).
#define POWER_SUM_THREADS 128
extern "C" __global__ void power_weighted_sums(const float* __restrict__ power, int m,
                                               int npix, const double* __restrict__ weights,
                                               int n_weights, double* __restrict__ out) {
    __shared__ double partial[POWER_SUM_THREADS];
    const int i = blockIdx.x;
    const int w = blockIdx.y;
    const int t = threadIdx.x;
    if (i >= m || w >= n_weights || t >= POWER_SUM_THREADS) return;
    const float* row = power + (size_t)i * npix;
    const double* wr = weights + (size_t)w * npix;
    double acc = 0.0;
    for (int p = t; p < npix; p += POWER_SUM_THREADS) acc += (double)row[p] * wr[p];
    partial[t] = acc;
    __syncthreads();
    for (int half = POWER_SUM_THREADS / 2; half > 0; half >>= 1) {
        if (t < half) partial[t] += partial[t + half];
        __syncthreads();
    }
    if (t == 0) out[(size_t)i * n_weights + w] = partial[0];
}

// Candidate rotations of the local search about a fulcrum
// (engine/local_grid.py rotations_about_fulcrum), in double, stored as float32
// for score_tiles:
//   A = A_cons R(v), R(v) the active right-handed rotation by the rotation
//   vector v (axis times angle, degrees) through its unit quaternion
//   (cos(h), v/|v| sin(h)), h = |v|/2 in radians; v = 0 gives the identity;
//   term = ((A - A_cons) f)_xy (pixels), f the fulcrum (x y z, pixels).
// grid: (ceil(J / blockDim.x), m); a_cons: (m, 9) row-major RELION matrices;
// rotvecs: (m, J, 3); fulcrum: 3 doubles; rot: (m, J, 9); term: (m, J, 2).
extern "C" __global__ void candidate_rotations(const double* __restrict__ a_cons,
                                               const double* __restrict__ rotvecs, int m,
                                               int J, const double* __restrict__ fulcrum,
                                               float* __restrict__ rot,
                                               float* __restrict__ term) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int i = blockIdx.y;
    if (j >= J || i >= m) return;
    const size_t row = (size_t)i * J + j;
    const double deg = 0.017453292519943295;  // pi / 180
    const double vx = rotvecs[3 * row] * deg;
    const double vy = rotvecs[3 * row + 1] * deg;
    const double vz = rotvecs[3 * row + 2] * deg;
    const double half = sqrt(vx * vx + vy * vy + vz * vz) / 2;
    const double w = cos(half);
    const double scale = half > 0 ? 0.5 * sin(half) / half : 0.5;
    const double x = vx * scale, y = vy * scale, z = vz * scale;
    double r[9];
    r[0] = 1 - 2 * (y * y + z * z);
    r[1] = 2 * (x * y - w * z);
    r[2] = 2 * (x * z + w * y);
    r[3] = 2 * (x * y + w * z);
    r[4] = 1 - 2 * (x * x + z * z);
    r[5] = 2 * (y * z - w * x);
    r[6] = 2 * (x * z - w * y);
    r[7] = 2 * (y * z + w * x);
    r[8] = 1 - 2 * (x * x + y * y);
    const double* a = a_cons + 9 * (size_t)i;
    float* out = rot + 9 * row;
    double d[6];  // rows x and y of A - A_cons
#pragma unroll
    for (int e = 0; e < 3; ++e) {
#pragma unroll
        for (int c = 0; c < 3; ++c) {
            const double v = (a[3 * e] * r[c] + a[3 * e + 1] * r[3 + c]) + a[3 * e + 2] * r[6 + c];
            out[3 * e + c] = (float)v;
            if (e < 2) d[3 * e + c] = v - a[3 * e + c];
        }
    }
    const double fx = fulcrum[0], fy = fulcrum[1], fz = fulcrum[2];
    term[2 * row] = (float)((d[0] * fx + d[1] * fy) + d[2] * fz);
    term[2 * row + 1] = (float)((d[3] * fx + d[4] * fy) + d[5] * fz);
}
