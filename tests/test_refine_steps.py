"""The refinement's steps composed as the refine loop composes them.

The alignment pass inserts every batch at its new poses while its images are
in memory (``align_particles(accumulators=...)``), so an iteration reads the
images twice (alignment, noise) instead of three times. These tests check that
those accumulators equal a separate reconstruction pass over the particles at
the poses the alignment returned.
"""

from __future__ import annotations

import numpy as np
import pytest

from localrefine_plugin.engine import mrc_io, reconstruct, refine_steps, scoring
from localrefine_plugin.engine.geometry import geodesic_angle_deg, matrix_to_euler
from localrefine_plugin.engine.particles import read_particles
from localrefine_plugin.engine.refine import RefineOptions

from .test_refine import BOX, make_dataset


@pytest.mark.parametrize(("top_k", "threads"), [(1, 1), (3, 2)])
def test_alignment_pass_inserts_as_a_reconstruction_pass_would(
    tmp_path, top_k, threads
):
    data = make_dataset(
        tmp_path / "data", n=24, snr=2.0, perturb_deg=3.0, perturb_px=1.0
    )
    particles = read_particles(data["star"])
    mask, _ = mrc_io.read_map(data["mask"])
    reference, _ = mrc_io.read_map(data["reference"])
    refs = np.stack([reference * mask] * 2).astype(np.float32)
    options = RefineOptions(batch_size=5, marginalize_top_k=top_k, threads=threads)
    consensus = particles.matrices()
    sigma2 = refine_steps.estimate_noise(
        particles,
        refs,
        rotations=consensus,
        origins_px=particles.origin_px,
        options=options,
    )
    accumulators = reconstruct.half_set_accumulators(particles.box)
    aligned = refine_steps.align_particles(
        particles,
        refs,
        sigma2,
        consensus_rotations=consensus,
        consensus_origins_px=particles.origin_px,
        fulcrum_px=np.zeros(3),
        options=options,
        r_max_px=BOX / 4,
        score_fn=scoring.score_poses,
        power_fn=scoring.weighted_projection_power,
        label="test",
        accumulators=accumulators,
    )
    # the poses moved, so inserting at the input poses would not pass
    assert np.median(geodesic_angle_deg(aligned.rotations, consensus)) > 0.5
    assert sum(bp.n_inserted for bp in accumulators) == top_k * particles.n

    px = particles.pixel_size_a
    fused = refine_steps.reconstruct_and_compare(
        accumulators, mask, pixel_size_a=px, options=options
    )
    # a pass of its own over the images, at the poses the alignment returned
    moved = particles.with_poses(
        *matrix_to_euler(aligned.rotations), aligned.origins_px
    )
    top = (aligned.top_rotations, aligned.top_origins_px, aligned.top_weights)
    separate = refine_steps.reconstruct_and_compare(
        reconstruct.reconstruct_particles(
            moved, batch_size=options.batch_size, top_k_poses=top if top_k > 1 else None
        ),
        mask,
        pixel_size_a=px,
        options=options,
    )
    scale = np.abs(separate.raw_halves).max()
    np.testing.assert_allclose(
        fused.raw_halves, separate.raw_halves, rtol=0, atol=1e-6 * scale
    )
    np.testing.assert_allclose(fused.full, separate.full, rtol=0, atol=1e-6 * scale)
    assert fused.fsc.resolution_0143.value_a == pytest.approx(
        separate.fsc.resolution_0143.value_a, rel=1e-6
    )


def test_noise_from_a_capped_subset_reads_only_that_subset(tmp_path):
    data = make_dataset(tmp_path / "data", n=60, snr=2.0)
    particles = read_particles(data["star"])
    reference, _ = mrc_io.read_map(data["reference"])
    refs = np.stack([reference] * 2).astype(np.float32)
    read = []
    load = particles.load_images

    def counting(idx):
        read.extend(np.asarray(idx).tolist())
        return load(idx)

    particles.load_images = counting
    kwargs = dict(rotations=particles.matrices(), origins_px=particles.origin_px)
    capped = refine_steps.estimate_noise(
        particles,
        refs,
        options=RefineOptions(noise_particles=20, batch_size=7),
        **kwargs,
    )
    chosen = sorted(read)
    assert len(chosen) == 20 and len(set(chosen)) == 20  # one optics group, capped
    # the same as estimating from exactly those particles ...
    sub = read_particles(data["star"]).subset(np.array(chosen))
    want = refine_steps.estimate_noise(
        sub,
        refs,
        rotations=sub.matrices(),
        origins_px=sub.origin_px,
        options=RefineOptions(noise_particles=0),
    )
    np.testing.assert_allclose(capped, want, rtol=1e-6)
    # ... and, averaged over shells 4-20, within sampling error of all 60
    every = refine_steps.estimate_noise(
        read_particles(data["star"]),
        refs,
        options=RefineOptions(noise_particles=0),
        **kwargs,
    )
    ratio = capped[0, 4:21].mean() / every[0, 4:21].mean()
    assert abs(ratio - 1) < 0.05


def test_read_batch_in_threads_gives_the_same_transforms_and_ctfs(tmp_path):
    """``read_batch(workers=k)`` (the GPU path's preparation with --threads k)
    splits the FFTs and CTFs over k threads: the same arrays, in the same
    order, as one thread, also with more workers than particles."""
    data = make_dataset(tmp_path / "data", n=10, snr=2.0)
    particles = read_particles(data["star"])
    idx = np.array([7, 2, 9, 0, 4])
    images_f, ctf = reconstruct.read_batch(particles, idx)
    assert images_f.shape == ctf.shape == (5, BOX, BOX // 2 + 1)
    for workers in (2, 3, 8):
        got_f, got_ctf = reconstruct.read_batch(particles, idx, workers=workers)
        assert got_f.dtype == images_f.dtype and got_ctf.dtype == ctf.dtype
        np.testing.assert_array_equal(got_f, images_f)
        np.testing.assert_array_equal(got_ctf, ctf)
    # the transforms written into arrays the caller allocates (the GPU path's
    # page-locked buffers), with one worker and with several
    for workers in (1, 3):
        given = []

        def allocate(shape, dtype, given=given):
            given.append(np.full(shape, np.nan, dtype))
            return given[-1]

        got_f, _ = reconstruct.read_batch(
            particles, idx, workers=workers, allocate=allocate
        )
        assert len(given) == 1 and got_f is given[0]
        np.testing.assert_array_equal(got_f, images_f)
    # no CTF in the set: ones, one image viewed for all (stride 0)
    particles.ctf = None
    got_f, ones = reconstruct.read_batch(particles, idx, workers=2)
    np.testing.assert_array_equal(got_f, images_f)
    assert ones.shape == ctf.shape and ones.dtype == np.float32
    assert ones.strides[0] == 0 and np.all(ones == 1)


def test_prefetched_prepares_the_next_item_while_this_one_is_worked_on():
    import threading

    started = [threading.Event() for _ in range(4)]
    worker_threads = set()

    def prepare(i):
        worker_threads.add(threading.get_ident())
        started[i].set()
        return i, 10 * i

    def work(i, v):
        if i + 1 < len(started):  # the next item's preparation has begun meanwhile
            assert started[i + 1].wait(timeout=10)
        return i, v, threading.get_ident()

    out = list(refine_steps.prefetched(prepare, work, [0, 1, 2, 3]))
    assert [(i, v) for i, v, _ in out] == [(0, 0), (1, 10), (2, 20), (3, 30)]
    assert {t for *_, t in out} == {threading.get_ident()}  # work on this thread
    assert threading.get_ident() not in worker_threads  # prepare on another
    assert list(refine_steps.prefetched(prepare, work, [])) == []


def test_prefetched_raises_the_preparation_error_in_order():
    def prepare(i):
        if i == 1:
            raise ValueError("bad stack")
        return (i,)

    got = []
    with pytest.raises(ValueError, match="bad stack"):
        for r in refine_steps.prefetched(prepare, lambda i: i, [0, 1, 2]):
            got.append(r)
    assert got == [0]
