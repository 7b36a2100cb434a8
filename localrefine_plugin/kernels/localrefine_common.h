// Shared __host__ __device__ helpers of the localrefine CUDA kernels.
//
// Conventions (docs/conventions.md; mirrored from engine/projector.py):
// * Rotations are RELION matrices A (ZYZ Euler, Euler_angles2matrix), stored
//   row-major as 9 floats a[3*r + c]. Image frequency (kx, ky) (cycles per
//   box) samples the map's transform at A^T (kx, ky, 0) = kx*A[0,:] + ky*A[1,:].
// * Image transforms use the half-plane layout of engine/fourier.py:
//   F = rfft2(ifftshift(img)), shape (N, N/2+1), row y is ky = y (y <= N/2)
//   or y - N, column x is kx = x. Kernels work on a list of the P pixels
//   inside a radius (their kx, ky and flat index y*(N/2+1)+x).
// * A real shift by (dx, dy) pixels multiplies F by exp(-2 pi i (kx dx + ky dy)/N).
// * Padded Fourier volume (FourierProjector.data): complex float2 array of
//   shape (2c+2, 2c+2, c+2), index [z+c][y+c][x] for the padded frequency
//   (x, y, z), x = 0..c and y, z = -c..c; the last plane on each axis is a zero
//   guard. A padded frequency is padding * (unpadded frequency). Points with
//   x < 0 are the complex conjugate at -q (Friedel symmetry of a real map).
// * Trilinear interpolation: floor and fraction of q, corner indices clipped
//   into [0, dim-2] exactly as engine.projector.trilinear_corners does.
#ifndef LOCALREFINE_COMMON_H
#define LOCALREFINE_COMMON_H

#ifdef __CUDACC__
#define LR_HD __host__ __device__ __forceinline__
#else
#define LR_HD inline
#endif

#include <math.h>

struct LrCorners {
    int base;      // flat index of the (0, 0, 0) corner
    int sy, sz;    // strides of y and z in elements
    float fx, fy, fz;  // fractional parts
    bool conj;     // the point was mirrored (x < 0)
};

LR_HD int lr_clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Padded-grid coordinate q = padding * A^T (kx, ky, 0) of one pixel.
LR_HD void lr_slice_point(const float* a, float kx, float ky, float padding,
                          float* qx, float* qy, float* qz) {
    *qx = padding * (kx * a[0] + ky * a[3]);
    *qy = padding * (kx * a[1] + ky * a[4]);
    *qz = padding * (kx * a[2] + ky * a[5]);
}

// Corners of q in the padded layout of radius c. With reject_outside, false
// if |q| > c (sampling reads zero there, as FourierProjector.sample); without,
// corners are clipped into the array (as BackProjector.insert).
LR_HD bool lr_corners(float qx, float qy, float qz, int c, bool reject_outside,
                      LrCorners* out) {
    if (reject_outside && qx * qx + qy * qy + qz * qz > (float)c * (float)c) return false;
    out->conj = qx < 0.0f;
    if (out->conj) { qx = -qx; qy = -qy; qz = -qz; }
    const float flx = floorf(qx), fly = floorf(qy), flz = floorf(qz);
    out->fx = qx - flx;
    out->fy = qy - fly;
    out->fz = qz - flz;
    const int nx = c + 2, ny = 2 * c + 2, nz = 2 * c + 2;
    const int ix = lr_clampi((int)flx, 0, nx - 2);
    const int iy = lr_clampi((int)fly + c, 0, ny - 2);
    const int iz = lr_clampi((int)flz + c, 0, nz - 2);
    out->sy = nx;
    out->sz = nx * ny;
    out->base = iz * out->sz + iy * out->sy + ix;
    return true;
}

// Trilinear value of the padded volume at q (conjugated when mirrored).
LR_HD float2 lr_sample(const float2* __restrict__ vol, int c, float qx, float qy, float qz) {
    LrCorners k;
    float2 v = make_float2(0.0f, 0.0f);
    if (!lr_corners(qx, qy, qz, c, true, &k)) return v;
    const float gx = 1.0f - k.fx, gy = 1.0f - k.fy, gz = 1.0f - k.fz;
    const int b = k.base, sy = k.sy, sz = k.sz;
    const float w[8] = {gz * gy * gx, gz * gy * k.fx, gz * k.fy * gx, gz * k.fy * k.fx,
                        k.fz * gy * gx, k.fz * gy * k.fx, k.fz * k.fy * gx, k.fz * k.fy * k.fx};
    const int o[8] = {0, 1, sy, sy + 1, sz, sz + 1, sz + sy, sz + sy + 1};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const float2 d = vol[b + o[j]];
        v.x += w[j] * d.x;
        v.y += w[j] * d.y;
    }
    if (k.conj) v.y = -v.y;
    return v;
}

#endif  // LOCALREFINE_COMMON_H
