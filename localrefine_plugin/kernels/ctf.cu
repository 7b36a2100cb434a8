// CTFs of a batch of particles on the half-plane Fourier grid, evaluated on the
// device from per-particle coefficients (engine/ctf.py, ctf_coefficients), so
// that the local search uploads 8 numbers per particle instead of N (N/2+1)
// CTF values (cuda_search_ops.py).
// Grid: row r of the (N, N/2+1) layout has ky = r for r < (N+1)/2, else r - N;
// column c has kx = c (cycles per box; engine/fourier.py). With
// sx = kx / (N px), sy = ky / (N px) (1/Angstrom), u2 = sx^2 + sy^2 and the
// angle alpha of (sx, sy) (alpha = 0 at the origin, as atan2(0, 0)):
//   defocus = c0 + c1 cos 2alpha + c2 sin 2alpha
//   chi     = c3 defocus u2 + c4 u2^2 + c5
//   ctf     = c7 sin(chi) exp(c6 u2)
// in double (|chi| reaches hundreds of radians at high defocus), stored as float.
// Loaded with no_extern_c=True.
#include "localrefine_common.h"

// grid: (ceil(N (N/2+1) / blockDim.x), m); coef: (m, 8) double;
// inv_box_a = 1 / (N px) (1/Angstrom); out: (m, N, N/2+1) float.
extern "C" __global__ void ctf_half_plane(const double* __restrict__ coef, int m, int n,
                                          double inv_box_a, float* __restrict__ out) {
    const int half = n / 2 + 1;
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    const int i = blockIdx.y;
    if (p >= n * half || i >= m) return;
    const int row = p / half;
    const int kx = p - row * half;
    const int ky = row < (n + 1) / 2 ? row : row - n;
    const double sx = kx * inv_box_a, sy = ky * inv_box_a;
    const double u2 = sx * sx + sy * sy;
    double cos2 = 1.0, sin2 = 0.0;  // alpha = 0 at the origin
    if (u2 > 0.0) {
        cos2 = (sx * sx - sy * sy) / u2;
        sin2 = 2.0 * sx * sy / u2;
    }
    const double* c = coef + (size_t)i * 8;
    const double defocus = c[0] + c[1] * cos2 + c[2] * sin2;
    const double chi = c[3] * defocus * u2 + c[4] * u2 * u2 + c[5];
    double value = c[7] * sin(chi);
    if (c[6] != 0.0) value *= exp(c[6] * u2);
    out[(size_t)i * n * half + p] = (float)value;
}
