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

// Corners of q in the padded layout of radius rl (rl = c for the volume
// itself; see lr_sample_cells for rl < c). With reject_outside, false if
// |q| > c (sampling reads zero there, as FourierProjector.sample); without,
// corners are clipped into the array (as BackProjector.insert).
LR_HD bool lr_corners_in(float qx, float qy, float qz, int c, int rl, bool reject_outside,
                         LrCorners* out) {
    if (reject_outside && qx * qx + qy * qy + qz * qz > (float)c * (float)c) return false;
    out->conj = qx < 0.0f;
    if (out->conj) { qx = -qx; qy = -qy; qz = -qz; }
    const float flx = floorf(qx), fly = floorf(qy), flz = floorf(qz);
    out->fx = qx - flx;
    out->fy = qy - fly;
    out->fz = qz - flz;
    const int nx = rl + 2, ny = 2 * rl + 2, nz = 2 * rl + 2;
    const int ix = lr_clampi((int)flx, 0, nx - 2);
    const int iy = lr_clampi((int)fly + rl, 0, ny - 2);
    const int iz = lr_clampi((int)flz + rl, 0, nz - 2);
    out->sy = nx;
    out->sz = nx * ny;
    out->base = iz * out->sz + iy * out->sy + ix;
    return true;
}

// Corners of q in the padded layout of radius c (the volume's own).
LR_HD bool lr_corners(float qx, float qy, float qz, int c, bool reject_outside,
                      LrCorners* out) {
    return lr_corners_in(qx, qy, qz, c, c, reject_outside, out);
}

// Trilinear weights of the 8 corners, in the order of lr_corner_offsets.
LR_HD void lr_trilinear_weights(const LrCorners& k, float* t) {
    const float gx = 1.0f - k.fx, gy = 1.0f - k.fy, gz = 1.0f - k.fz;
    t[0] = gz * gy * gx;
    t[1] = gz * gy * k.fx;
    t[2] = gz * k.fy * gx;
    t[3] = gz * k.fy * k.fx;
    t[4] = k.fz * gy * gx;
    t[5] = k.fz * gy * k.fx;
    t[6] = k.fz * k.fy * gx;
    t[7] = k.fz * k.fy * k.fx;
}

// Flat offsets of the 8 corners from k.base: (x, y, z) in {0, 1}^3, x fastest.
LR_HD void lr_corner_offsets(const LrCorners& k, int* o) {
    o[0] = 0;
    o[1] = 1;
    o[2] = k.sy;
    o[3] = k.sy + 1;
    o[4] = k.sz;
    o[5] = k.sz + 1;
    o[6] = k.sz + k.sy;
    o[7] = k.sz + k.sy + 1;
}

// Trilinear value of the padded volume at q (conjugated when mirrored).
LR_HD float2 lr_sample(const float2* __restrict__ vol, int c, float qx, float qy, float qz) {
    LrCorners k;
    float2 v = make_float2(0.0f, 0.0f);
    if (!lr_corners(qx, qy, qz, c, true, &k)) return v;
    float w[8];
    int o[8];
    lr_trilinear_weights(k, w);
    lr_corner_offsets(k, o);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const float2 d = vol[k.base + o[j]];
        v.x += w[j] * d.x;
        v.y += w[j] * d.y;
    }
    if (k.conj) v.y = -v.y;
    return v;
}

// The same value read from "cells": cell b of the padded layout of radius rc
// (<= c) holds, as 4 float4 (64 bytes), the 8 corners vol[b + o_j] of
// lr_corner_offsets in that order (kernel build_cells, projector.cu). One
// sample reads 2 aligned 32-byte sectors instead of the 8 scattered corners
// (about 4-5 sectors with padding 2). Equal to lr_sample for |q| <= rc - 1,
// which the host guarantees (rc >= padding * r_max + 2; cuda_projector.py);
// beyond that the corners are clipped into the cells (no out-of-bounds read).
LR_HD float2 lr_sample_cells(const float4* __restrict__ cells, int c, int rc, float qx,
                             float qy, float qz) {
    LrCorners k;
    float2 v = make_float2(0.0f, 0.0f);
    if (!lr_corners_in(qx, qy, qz, c, rc, true, &k)) return v;
    float w[8];
    lr_trilinear_weights(k, w);
    const float4* cell = cells + 4 * (size_t)k.base;
#pragma unroll
    for (int h = 0; h < 4; ++h) {
        const float4 d = cell[h];
        v.x += w[2 * h] * d.x;
        v.y += w[2 * h] * d.y;
        v.x += w[2 * h + 1] * d.z;
        v.y += w[2 * h + 1] * d.w;
    }
    if (k.conj) v.y = -v.y;
    return v;
}

#endif  // LOCALREFINE_COMMON_H
