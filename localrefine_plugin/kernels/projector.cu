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

// Cells of the padded volume for lr_sample_cells: cell b of the padded layout
// of radius rc (<= c; shape (2rc+2, 2rc+2, rc+2)) gets the 8 corners
// vol[(x+dx, y+dy, z+dz)] of its voxel (x, y, z) = (ix, iy - rc, iz - rc), in
// the order of lr_corner_offsets (dx fastest), as 4 float4; corners outside
// the volume are zero (they lie on its zero guard planes or beyond).
// grid: (ceil(ncells / blockDim.x),); one thread per cell.
extern "C" __global__ void build_cells(const float2* __restrict__ vol, int c, int rc,
                                       float4* __restrict__ cells) {
    const int nx = rc + 2, ny = 2 * rc + 2;
    const size_t ncells = (size_t)ny * ny * nx;
    const size_t b = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= ncells || rc > c) return;
    const int ix = (int)(b % nx);
    const int iy = (int)((b / nx) % ny);
    const int iz = (int)(b / ((size_t)nx * ny));
    const int vx = c + 2, vy = 2 * c + 2;  // the volume's own shape (x, y; z as y)
    float2 d[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int x = ix + (j & 1), y = iy - rc + c + ((j >> 1) & 1),
                  z = iz - rc + c + (j >> 2);
        const bool in = x < vx && y >= 0 && y < vy && z >= 0 && z < vy;
        d[j] = in ? vol[((size_t)z * vy + y) * vx + x] : make_float2(0.0f, 0.0f);
    }
#pragma unroll
    for (int h = 0; h < 4; ++h)
        cells[4 * b + h] = make_float4(d[2 * h].x, d[2 * h].y, d[2 * h + 1].x, d[2 * h + 1].y);
}
