// Reductions of a scored pose grid for the branch-and-bound search, so that the
// grid stays on the device (engine/search_ops.py: grid.best and grid.minima).
// Loaded by cuda_search_ops.py with no_extern_c=True.
//
// For particle i, rotation j, shift s the value is
//   v[i, j, s] = ((double)e[i, j, s] + add_r[i, j]) + add_s[i, s]
// with e the float32 scores of score_tiles (m, J, S) and float64 addends
// (priors, bound terms; +inf on the padding). The sums are done in double in
// this order, as the host does them (engine/search_ops.py HostGrid), so the
// minima equal the host's for the same e.
#include "localrefine_common.h"

// Per (i, j): minimum over s and its first index.
// grid: (ceil(J / blockDim.x), m); one thread per (rotation, particle).
extern "C" __global__ void grid_min_over_shifts(const float* __restrict__ e,
                                                const double* __restrict__ add_r,
                                                const double* __restrict__ add_s, int m,
                                                int J, int S, double* __restrict__ out_min,
                                                int* __restrict__ out_arg) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int i = blockIdx.y;
    if (j >= J || i >= m || S < 1) return;
    const size_t row = (size_t)i * J + j;
    const float* ej = e + row * S;
    const double a = add_r[row];
    const double* b = add_s + (size_t)i * S;
    double best = ((double)ej[0] + a) + b[0];
    int arg = 0;
    for (int s = 1; s < S; ++s) {
        const double v = ((double)ej[s] + a) + b[s];
        if (v < best) {  // strict: the first minimum, as numpy.argmin
            best = v;
            arg = s;
        }
    }
    out_min[row] = best;
    out_arg[row] = arg;
}

// Per (i, s): minimum over j. grid: (ceil(S / blockDim.x), m); neighbouring
// threads read neighbouring shifts (coalesced).
extern "C" __global__ void grid_min_over_rotations(const float* __restrict__ e,
                                                   const double* __restrict__ add_r,
                                                   const double* __restrict__ add_s, int m,
                                                   int J, int S,
                                                   double* __restrict__ out_min) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    const int i = blockIdx.y;
    if (s >= S || i >= m || J < 1) return;
    const float* ei = e + (size_t)i * J * S;
    const double* a = add_r + (size_t)i * J;
    const double b = add_s[(size_t)i * S + s];
    double best = ((double)ei[s] + a[0]) + b;
    for (int j = 1; j < J; ++j) {
        const double v = ((double)ei[(size_t)j * S + s] + a[j]) + b;
        best = v < best ? v : best;
    }
    out_min[(size_t)i * S + s] = best;
}

// Per particle: the first minimum of min_j over j (min_j, arg_j: the (m, J)
// outputs of grid_min_over_shifts), i.e. the first minimum of the whole grid
// in (rotation, shift) row-major order, as numpy.argmin of the flattened
// grid. grid: (m); block: (BEST_THREADS); only (j, s, value) per particle
// leave the device. Each thread scans j = t, t + BEST_THREADS, ... with a
// strict "<" (the first of its minima); pairs then combine by value, ties by
// the lower j.
#define BEST_THREADS 128
extern "C" __global__ void grid_best(const double* __restrict__ min_j,
                                     const int* __restrict__ arg_j, int m, int J,
                                     int* __restrict__ out_j, int* __restrict__ out_s,
                                     double* __restrict__ out_value) {
    const int i = blockIdx.x;
    if (i >= m || J < 1) return;
    __shared__ double s_value[BEST_THREADS];
    __shared__ int s_j[BEST_THREADS];
    const double* row = min_j + (size_t)i * J;
    double best = INFINITY;
    int best_j = J;  // no element: loses every comparison, ties included
    for (int j = threadIdx.x; j < J; j += BEST_THREADS) {
        if (row[j] < best || best_j == J) {
            best = row[j];
            best_j = j;
        }
    }
    s_value[threadIdx.x] = best;
    s_j[threadIdx.x] = best_j;
    __syncthreads();
    for (int half = BEST_THREADS / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) {
            const double v = s_value[threadIdx.x + half];
            const int j = s_j[threadIdx.x + half];
            if (v < s_value[threadIdx.x] || (v == s_value[threadIdx.x] && j < s_j[threadIdx.x])) {
                s_value[threadIdx.x] = v;
                s_j[threadIdx.x] = j;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        const int j = s_j[0];
        out_j[i] = j;
        out_s[i] = arg_j[(size_t)i * J + j];
        out_value[i] = s_value[0];
    }
}
