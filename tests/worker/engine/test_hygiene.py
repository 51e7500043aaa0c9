"""Evaluation hygiene: shared samples found by hash, reading a bounded number of bytes at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.builders import save_npz
from worker.engine import hygiene
from worker.engine.npz import NpzReader


def test_overlap_counts_shared_samples_reading_about_a_megabyte_at_a_time(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Samples of 300 KB are hashed three at a time (CHUNK_BYTES 1 MB), not 64: MTCNN's detector images held
    33 MB at once that way. Three of the evaluation samples are calibration samples, byte for byte."""
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((10, 3, 100, 250)).astype(np.float32)  # 300,000 bytes a sample
    ev = rng.standard_normal((8, 3, 100, 250)).astype(np.float32)
    ev[[1, 4, 6]] = calib[[0, 9, 5]]
    c = NpzReader(save_npz(tmp_path / "c.npz", x=calib))
    e = NpzReader(save_npz(tmp_path / "e.npz", x=ev))
    sizes: list[int] = []
    real = NpzReader.iter_chunks

    def recording(self: NpzReader, name: str, start: int, stop: int, chunk: int):
        for part in real(self, name, start, stop, chunk):
            sizes.append(part.shape[0])
            yield part

    monkeypatch.setattr(NpzReader, "iter_chunks", recording)
    ov = hygiene.overlap(c, (0, 10), e, (0, 8))
    assert (ov.evaluation_samples, ov.shared_samples, ov.identical_sets) == (8, 3, False)
    assert max(sizes) == 3 and sum(sizes) == 18
    # Calibration samples outside the range used are not counted.
    assert hygiene.overlap(c, (1, 9), e, (0, 8)).shared_samples == 1
