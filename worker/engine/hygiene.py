"""Evaluation hygiene: does the evaluation set share samples with the calibration set?

A figure measured on samples the model was calibrated (or trained) on is optimistic; an evaluation set
that repeats them says less than its size suggests. Samples are compared by a hash of their bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.engine.files import sha256_for
from worker.engine.npz import NpzReader

# Bytes of samples read at a time: a chunk's compressed read and its decoded copy are both alive while it is
# hashed. 64 samples a chunk held 33 MB at once for MTCNN's 180x240 detector images (32 of them, 518 KB each).
CHUNK_BYTES = 1 << 20


def sample_hashes(reader: NpzReader, start: int, stop: int) -> list[bytes]:
    """One digest per sample in [start, stop): every feature array's bytes for that sample, by name."""
    arrays = reader.info.feature_arrays()
    # OpenSSL's hashing where the samples add up to many megabytes (files.sha256_for)
    total = (stop - start) * sum(a.sample_bytes for a in arrays.values())
    digests = [sha256_for(total) for _ in range(stop - start)]
    for name in sorted(arrays):
        i = 0
        for chunk in reader.iter_chunks(name, start, stop, max(1, CHUNK_BYTES // max(1, arrays[name].sample_bytes))):
            for row in chunk:
                digests[i].update(name.encode())
                digests[i].update(row.tobytes())
                i += 1
    return [d.digest() for d in digests]


@dataclass(frozen=True)
class Overlap:
    evaluation_samples: int
    shared_samples: int
    identical_sets: bool

    def to_dict(self) -> dict[str, Any]:
        return {"evaluation_samples": self.evaluation_samples, "shared_with_calibration": self.shared_samples,
                "identical_to_calibration": self.identical_sets}

    def warning(self) -> str | None:
        if self.identical_sets:
            return ("the evaluation set is the calibration set: the figures are measured on the samples the "
                    "ranges were calibrated on, so they are optimistic; give an evaluation set of other samples")
        if self.shared_samples:
            return (f"{self.shared_samples} of the {self.evaluation_samples} evaluation samples also occur in the "
                    "calibration set: figures on them are optimistic; give an evaluation set of other samples")
        return None


def overlap(calib: NpzReader, calib_range: tuple[int, int], ev: NpzReader, eval_range: tuple[int, int]) -> Overlap:
    """How many evaluation samples also occur among the calibration samples that were used."""
    if sorted(calib.info.feature_arrays()) != sorted(ev.info.feature_arrays()):
        return Overlap(eval_range[1] - eval_range[0], 0, False)
    c = sample_hashes(calib, *calib_range)
    e = sample_hashes(ev, *eval_range)
    seen = set(c)
    shared = sum(1 for h in e if h in seen)
    return Overlap(len(e), shared, bool(e) and shared == len(e) and len(set(e)) == len(seen))
