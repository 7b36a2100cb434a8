"""Fourier shell correlation of half maps, masked and corrected for the mask.

Shells follow ``docs/conventions.md``: shell index ``rint(|k|)`` with ``k`` in
cycles per box, shells ``0 .. N//2``, shell ``k`` at resolution
``N * pixel_size / k`` Angstrom (as ``relion_postprocess``).

The mask correction is the phase-randomisation test of Chen et al. (2013),
Ultramicroscopy 135:24-35: beyond the randomisation shell,
``FSC_true = (FSC_t - FSC_n) / (1 - FSC_n)`` with ``FSC_t`` the masked FSC and
``FSC_n`` the masked FSC of the phase-randomised half maps.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.fft

from .errors import InputError
from .filters import randomize_phases_beyond
from .fourier import resolution_of_shell_a, shell_index_3d
from .star import read_star

__all__ = [
    "RANDOMIZE_AT_FSC",
    "Resolution",
    "FscResult",
    "fsc_curve",
    "resolution_at",
    "compute_fsc",
    "mask_corrected_fsc",
    "write_fsc_csv",
    "read_fsc_file",
    "fsc_file_resolution",
    "plot_fsc",
]

log = logging.getLogger(__name__)

#: Phases are randomised from the first shell where the unmasked FSC drops
#: below this value (RELION's ``--randomize_at_fsc`` default).
RANDOMIZE_AT_FSC = 0.8

#: The corrected FSC is the masked FSC for shells below the randomisation shell
#: plus this margin (see :func:`mask_corrected_fsc`).
_CORRECTION_SHELL_MARGIN = 2


@dataclass(frozen=True)
class Resolution:
    """A resolution read off an FSC curve.

    Attributes
    ----------
    value_a : float
        Resolution in Angstrom. When ``crossed`` is False the curve never fell
        below the threshold and this is the resolution of the last shell
        (Nyquist, ``2 * pixel_size``): the true resolution is *at least* this
        good, and nothing is extrapolated.
    crossed : bool
        True when the curve falls below the threshold within shells
        ``1 .. N//2``.
    shell : float
        Fractional shell (cycles per box) of ``value_a``.
    threshold : float
        The FSC threshold used.
    """

    value_a: float
    crossed: bool
    shell: float
    threshold: float

    def __str__(self) -> str:
        if self.crossed:
            return f"{self.value_a:.2f} A"
        return (
            f"better than {self.value_a:.2f} A (Nyquist; FSC never fell below "
            f"{self.threshold})"
        )


@dataclass(frozen=True)
class FscResult:
    """FSC curves of two half maps, all shaped ``(N//2 + 1,)`` over shells 0..N//2.

    Attributes
    ----------
    shell : ndarray of int
        Shell index (cycles per box).
    resolution_a : ndarray of float
        Resolution of each shell in Angstrom (``inf`` at shell 0).
    fsc_unmasked, fsc_masked : ndarray of float
        FSC of the half maps without and with the mask (equal without a mask).
    fsc_randomised : ndarray of float
        Masked FSC of the half maps with phases randomised from
        ``randomize_shell`` on; NaN when no mask was given (nothing to correct).
    fsc_corrected : ndarray of float
        Masked FSC corrected for the mask (Chen et al. 2013).
    randomize_shell : int
        First randomised shell (cycles per box); ``N//2 + 1`` when the unmasked
        FSC never dropped below :data:`RANDOMIZE_AT_FSC` (no correction).
    resolution_0143, resolution_05 : Resolution
        Resolutions of ``fsc_corrected`` at 0.143 and 0.5.
    n : int
        Box size (pixels).
    pixel_size_a : float
        Pixel size in Angstrom.
    """

    shell: np.ndarray
    resolution_a: np.ndarray
    fsc_unmasked: np.ndarray
    fsc_masked: np.ndarray
    fsc_randomised: np.ndarray
    fsc_corrected: np.ndarray
    randomize_shell: int
    resolution_0143: Resolution
    resolution_05: Resolution
    n: int
    pixel_size_a: float


def fsc_curve(map1: np.ndarray, map2: np.ndarray) -> np.ndarray:
    """Fourier shell correlation of two maps.

    ``FSC(k) = Re sum F1 F2* / sqrt(sum |F1|^2 sum |F2|^2)`` over the Fourier
    components of shell ``k = rint(|k|)`` (cycles per box), summed over the
    half-space grid of ``rfftn`` as RELION does.

    Parameters
    ----------
    map1, map2 : ndarray, shape (N, N, N), float32 or float64
        Maps ``[z, y, x]`` on the same grid.

    Returns
    -------
    ndarray, shape (N//2 + 1,), float64
        FSC of shells ``0 .. N//2``; 0 where a shell has no power.
    """
    map1 = np.asarray(map1)
    map2 = np.asarray(map2)
    if map1.shape != map2.shape or map1.ndim != 3 or len(set(map1.shape)) != 1:
        raise ValueError(
            f"expected two cubic maps of the same shape, got {map1.shape} "
            f"and {map2.shape}"
        )
    n = map1.shape[0]
    # No ifftshift: centring multiplies F1 and F2 by the same unit phase factor,
    # which cancels in F1 F2*; scipy keeps float32 -> complex64 (faster, half memory)
    f1 = scipy.fft.rfftn(map1).ravel()  # layout of fourier.volume_to_fourier
    f2 = scipy.fft.rfftn(map2).ravel()
    shells = shell_index_3d(n).ravel()  # (N*N*(N//2+1),)
    n_shells = n // 2 + 1
    num = np.bincount(shells, f1.real * f2.real + f1.imag * f2.imag)[:n_shells]
    p1 = np.bincount(shells, f1.real * f1.real + f1.imag * f1.imag)[:n_shells]
    p2 = np.bincount(shells, f2.real * f2.real + f2.imag * f2.imag)[:n_shells]
    den = np.sqrt(p1 * p2)
    return np.divide(num, den, out=np.zeros(n_shells), where=den > 0)


def resolution_at(
    fsc: np.ndarray, threshold: float, *, n: int, pixel_size_a: float
) -> Resolution:
    """The resolution where an FSC curve first falls below ``threshold``.

    Scans shells ``1 .. N//2`` for the first shell ``i`` with
    ``fsc[i] < threshold`` and interpolates linearly in frequency between
    shells ``i - 1`` and ``i``. ``relion_postprocess`` reports the resolution
    of shell ``i - 1`` (no interpolation), so the two agree within one shell.
    Never extrapolates: if the curve stays at or above the threshold up to
    Nyquist, the result is Nyquist with ``crossed=False``.

    Parameters
    ----------
    fsc : ndarray, shape (N//2 + 1,)
        FSC over shells ``0 .. N//2``.
    threshold : float
        FSC threshold, e.g. 0.143 or 0.5.
    n : int
        Box size (pixels).
    pixel_size_a : float
        Pixel size in Angstrom.

    Returns
    -------
    Resolution
    """
    fsc = np.asarray(fsc, dtype=np.float64)
    if fsc.shape != (n // 2 + 1,):
        raise ValueError(f"expected an FSC of shape ({n // 2 + 1},), got {fsc.shape}")
    below = np.nonzero(fsc[1:] < threshold)[0]
    if below.size == 0:
        last = float(n // 2)
        value = float(resolution_of_shell_a(last, n, pixel_size_a))
        return Resolution(value, False, last, threshold)
    i = int(below[0]) + 1
    hi, lo = fsc[i - 1], fsc[i]
    frac = 1.0 if hi <= threshold else (hi - threshold) / (hi - lo)
    shell = (i - 1) + float(np.clip(frac, 0.0, 1.0))
    value = float(resolution_of_shell_a(shell, n, pixel_size_a))
    return Resolution(value, True, shell, threshold)


def _randomize_shell(fsc_unmasked: np.ndarray) -> int:
    """First shell >= 1 where the unmasked FSC drops below RANDOMIZE_AT_FSC."""
    below = np.nonzero(fsc_unmasked[1:] < RANDOMIZE_AT_FSC)[0]
    return int(below[0]) + 1 if below.size else len(fsc_unmasked)


def compute_fsc(
    half1: np.ndarray,
    half2: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    pixel_size_a: float,
    randomize_from: int | None = None,
    seed: int = 0,
) -> FscResult:
    """Gold-standard FSC of two half maps with the phase-randomisation correction.

    Parameters
    ----------
    half1, half2 : ndarray, shape (N, N, N), float32 or float64
        Independent half maps ``[z, y, x]``.
    mask : ndarray, shape (N, N, N), values in [0, 1], optional
        Soft mask multiplied into both half maps for the masked FSC. Without a
        mask, the masked and corrected curves equal the unmasked one.
    pixel_size_a : float
        Pixel size in Angstrom.
    randomize_from : int, optional
        First phase-randomised shell (cycles per box). Default: the first shell
        where the unmasked FSC drops below :data:`RANDOMIZE_AT_FSC` (0.8), as
        ``relion_postprocess``.
    seed : int
        Seed of the random phases.

    Returns
    -------
    FscResult
        Resolutions are read off the corrected curve.
    """
    half1 = np.asarray(half1)
    half2 = np.asarray(half2)
    n = half1.shape[0]
    shell = np.arange(n // 2 + 1)
    unmasked = fsc_curve(half1, half2)
    rand_shell = (
        _randomize_shell(unmasked) if randomize_from is None else randomize_from
    )
    rand_shell = int(rand_shell)
    if mask is None:
        masked = unmasked.copy()
        randomised = np.full_like(unmasked, np.nan)
        corrected = unmasked.copy()
    else:
        mask = np.asarray(mask)
        if mask.shape != half1.shape:
            raise ValueError(f"mask shape {mask.shape} differs from map {half1.shape}")
        masked = fsc_curve(half1 * mask, half2 * mask)
        if rand_shell > n // 2:
            log.info(
                "unmasked FSC stays above %.2f up to Nyquist: no phase "
                "randomisation, the corrected FSC is the masked one",
                RANDOMIZE_AT_FSC,
            )
            randomised = masked.copy()
        else:
            log.debug("phase randomisation from shell %d", rand_shell)
            rng = np.random.default_rng(seed)
            r1 = randomize_phases_beyond(half1, rand_shell, rng=rng)
            r2 = randomize_phases_beyond(half2, rand_shell, rng=rng)
            randomised = fsc_curve(r1 * mask, r2 * mask)
        corrected = mask_corrected_fsc(masked, randomised, rand_shell)
    return FscResult(
        shell=shell,
        resolution_a=resolution_of_shell_a(shell, n, pixel_size_a),
        fsc_unmasked=unmasked,
        fsc_masked=masked,
        fsc_randomised=randomised,
        fsc_corrected=corrected,
        randomize_shell=rand_shell,
        resolution_0143=resolution_at(corrected, 0.143, n=n, pixel_size_a=pixel_size_a),
        resolution_05=resolution_at(corrected, 0.5, n=n, pixel_size_a=pixel_size_a),
        n=n,
        pixel_size_a=float(pixel_size_a),
    )


def mask_corrected_fsc(
    fsc_masked: np.ndarray, fsc_randomised: np.ndarray, randomize_shell: int
) -> np.ndarray:
    """Correct a masked FSC with its phase-randomised partner.

    Chen et al. (2013), Ultramicroscopy 135:24-35:
    ``FSC_true = (FSC_t - FSC_n) / (1 - FSC_n)`` for shells
    ``>= randomize_shell + 2``, ``FSC_t`` below that (the two shells right past
    the randomisation edge carry its artefacts; ``relion_postprocess`` 3.1 uses
    the same margin and, like here, does not clip negative values).

    Parameters
    ----------
    fsc_masked, fsc_randomised : ndarray, shape (N//2 + 1,)
        Masked FSC and masked FSC of the phase-randomised half maps.
    randomize_shell : int
        First phase-randomised shell (cycles per box).

    Returns
    -------
    ndarray, shape (N//2 + 1,), float64
    """
    t = np.asarray(fsc_masked, dtype=np.float64)
    r = np.asarray(fsc_randomised, dtype=np.float64)
    shell = np.arange(t.size)
    beyond = shell >= randomize_shell + _CORRECTION_SHELL_MARGIN
    out = t.copy()
    # a randomised FSC of 1 leaves nothing to correct against: guard the division
    out[beyond] = (t[beyond] - r[beyond]) / np.maximum(1.0 - r[beyond], 1e-12)
    return out


def _atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_fsc_csv(path, result: FscResult) -> None:
    """Write the FSC curves as CSV, atomically.

    Columns: ``shell,resolution_A,fsc_unmasked,fsc_masked,fsc_corrected``
    (shell in cycles per box, resolution in Angstrom, ``inf`` at shell 0).
    """
    path = Path(path)
    tmp = _atomic_path(path)
    rows = ["shell,resolution_A,fsc_unmasked,fsc_masked,fsc_corrected"]
    for i in range(len(result.shell)):
        rows.append(
            f"{int(result.shell[i])},{result.resolution_a[i]:.4f},"
            f"{result.fsc_unmasked[i]:.6f},{result.fsc_masked[i]:.6f},"
            f"{result.fsc_corrected[i]:.6f}"
        )
    try:
        tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


#: Columns holding the curve to read, best first: ours (``fsc.csv``), then
#: ``relion_postprocess``'s ``data_fsc`` and ``relion_refine``'s model STAR.
_FSC_FILE_COLUMNS = (
    "fsc_corrected",
    "rlnFourierShellCorrelationCorrected",
    "rlnGoldStandardFsc",
)


def read_fsc_file(path) -> tuple[np.ndarray, np.ndarray, str]:
    """Read an FSC curve over shells ``0 .. N//2`` from a file.

    Accepted: our ``fsc.csv`` (column ``fsc_corrected``), a
    ``relion_postprocess`` STAR (``data_fsc``, column
    ``rlnFourierShellCorrelationCorrected``) or a ``relion_refine``
    ``*_model.star`` (``data_model_class_1``, column ``rlnGoldStandardFsc``).

    Returns
    -------
    resolution_a : ndarray
        Resolution of each shell (Angstrom; ``inf`` at shell 0).
    fsc : ndarray
        The curve.
    column : str
        The column it came from.

    Raises
    ------
    InputError
        The file is missing, or holds no FSC curve this function knows.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "FSC file not found", "give an existing fsc.csv or STAR")
    fix = (
        "give our fsc.csv, relion_postprocess's postprocess.star or "
        "relion_refine's run_model.star"
    )
    if path.suffix.lower() == ".star":
        for block in read_star(path):
            cols = block.columns
            found = [c for c in _FSC_FILE_COLUMNS if c in cols]
            if not found or "rlnAngstromResolution" not in cols:
                continue
            res = block.column_as_float("rlnAngstromResolution")
            return _curve(path, res, block.column_as_float(found[0]), found[0], fix)
        raise InputError(
            path,
            "no table with rlnAngstromResolution and an FSC column "
            f"({', '.join(_FSC_FILE_COLUMNS[1:])})",
            fix,
        )
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    header = lines[0].split(",") if lines else []
    if "resolution_A" not in header or "fsc_corrected" not in header:
        raise InputError(path, "no resolution_A and fsc_corrected columns", fix)
    try:
        rows = np.array([[float(v) for v in ln.split(",")] for ln in lines[1:]])
    except ValueError as exc:
        raise InputError(path, f"a value is not a number ({exc})", fix) from None
    if rows.ndim != 2 or rows.shape[1] != len(header):
        raise InputError(path, "rows and header have different lengths", fix)
    res = rows[:, header.index("resolution_A")]
    fsc = rows[:, header.index("fsc_corrected")]
    return _curve(path, res, fsc, "fsc_corrected", fix)


def _curve(path: Path, res: np.ndarray, fsc: np.ndarray, column: str, fix: str):
    if res.size < 3 or not np.all(np.isfinite(fsc)):
        raise InputError(path, f"column {column}: too few shells or non-finite", fix)
    # RELION writes 999 for shell 0's resolution; ours writes inf
    res = np.where(np.arange(res.size) == 0, np.inf, res)
    if not np.all(np.diff(res[1:]) < 0):
        raise InputError(path, "resolutions are not decreasing shell by shell", fix)
    return res, fsc, column


def fsc_file_resolution(path, threshold: float = 0.143) -> Resolution:
    """The resolution (Angstrom) where a file's FSC curve falls below ``threshold``.

    See :func:`read_fsc_file` (formats) and :func:`resolution_at` (reading the
    crossing). The box and pixel size come from the curve itself: ``N//2 + 1``
    shells, Nyquist (the last shell) at ``2 * pixel_size``.
    """
    res, fsc, _ = read_fsc_file(path)
    n = 2 * (res.size - 1)
    return resolution_at(fsc, threshold, n=n, pixel_size_a=float(res[-1]) / 2)


def plot_fsc(path, result: FscResult, *, title: str | None = None) -> None:
    """Plot the unmasked, masked and corrected FSC against 1/resolution as a PNG.

    Draws the 0.143 threshold and marks the 0.143 resolution of the corrected
    curve. Written atomically; uses matplotlib's Agg backend.
    """
    with warnings.catch_warnings():
        # matplotlib 3.8 calls pyparsing APIs that pyparsing >= 3.3 deprecates
        warnings.filterwarnings(
            "ignore", category=DeprecationWarning, module=r"matplotlib\."
        )
        _plot_fsc(Path(path), result, title)


def _plot_fsc(path: Path, result: FscResult, title: str | None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    freq = result.shell / (result.n * result.pixel_size_a)  # 1/A
    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(freq, result.fsc_unmasked, color="0.55", lw=1.2, label="unmasked")
    if not np.array_equal(result.fsc_masked, result.fsc_unmasked):
        ax.plot(freq, result.fsc_masked, color="tab:blue", lw=1.2, label="masked")
    if np.isfinite(result.fsc_randomised).any():
        ax.plot(
            freq,
            result.fsc_randomised,
            color="tab:red",
            lw=0.8,
            ls=":",
            label="phase-randomised (masked)",
        )
    ax.plot(
        freq, result.fsc_corrected, color="black", lw=1.8, label="corrected (masked)"
    )
    ax.axhline(0.143, color="tab:green", lw=0.8, ls="--")
    ax.axhline(0.0, color="0.8", lw=0.6)
    res = result.resolution_0143
    ax.axvline(1.0 / res.value_a, color="tab:green", lw=0.8)
    label = (
        f"FSC = 0.143 at {res.value_a:.2f} Å"
        if res.crossed
        else f"FSC > 0.143 up to Nyquist:\nbetter than {res.value_a:.2f} Å"
    )
    ax.text(
        0.97,
        0.55,
        label,
        transform=ax.transAxes,
        ha="right",
        va="center",
        color="tab:green",
        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8},
    )
    ax.set_xlim(0.0, freq[-1])
    lowest = np.nanmin([result.fsc_masked, result.fsc_corrected, result.fsc_unmasked])
    ax.set_ylim(min(-0.1, float(lowest) - 0.05), 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    top = ax.twiny()  # the same axis labelled in Angstrom
    top.set_xlim(ax.get_xlim())
    ticks = [t for t in ax.get_xticks() if 0 < t <= freq[-1]]
    top.set_xticks(ticks)
    top.set_xticklabels([f"{1.0 / t:.3g}" for t in ticks])
    top.set_xlabel("resolution (Å)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    tmp = _atomic_path(path)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
