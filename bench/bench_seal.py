"""Sealing throughput: enclavefl.seal (Tink streaming AEAD) vs plain AES-256-GCM.

Both sides read the same 256 MiB file in pieces of the seal segment size, encrypt or
decrypt them, and write a temp file in the destination directory, fsync and os.replace,
so the I/O is the same. Repetitions alternate between the two; each ratio is the median
of the per-repetition ratios (wall clock; `*_cpu_ratio` uses process CPU time, which
other processes on a shared machine disturb less). Prints one JSON object.

    python bench/bench_seal.py [--size-mib 256] [--reps 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclavefl.seal.keys import create_key_file
from enclavefl.seal.sealed import SEGMENT_SIZE, seal_file, unseal_file

CHUNK = SEGMENT_SIZE
TAG = 16
TARGET = 0.8
BINDING = {"job_id": "bench", "name": "model", "version": 1}


def _replace_atomically(tmp_fd: int, tmp: str, dst: Path) -> None:
    os.fsync(tmp_fd)
    os.close(tmp_fd)
    os.replace(tmp, dst)


def plain_encrypt(src: Path, dst: Path, key: bytes) -> None:
    aead = AESGCM(key)
    fd, tmp = tempfile.mkstemp(dir=dst.parent)
    with open(src, "rb") as fin, open(fd, "wb", closefd=False) as fout:
        counter = 0
        while chunk := fin.read(CHUNK):
            fout.write(aead.encrypt(counter.to_bytes(12, "big"), chunk, b"bench"))
            counter += 1
    _replace_atomically(fd, tmp, dst)


def plain_decrypt(src: Path, dst: Path, key: bytes) -> None:
    aead = AESGCM(key)
    fd, tmp = tempfile.mkstemp(dir=dst.parent)
    with open(src, "rb") as fin, open(fd, "wb", closefd=False) as fout:
        counter = 0
        while chunk := fin.read(CHUNK + TAG):
            fout.write(aead.decrypt(counter.to_bytes(12, "big"), chunk, b"bench"))
            counter += 1
    _replace_atomically(fd, tmp, dst)


def _timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    logging.getLogger("enclavefl.seal.keys").setLevel(logging.ERROR)  # the file: key warning is expected here

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        size = args.size_mib << 20
        plain = work / "plain.bin"
        with open(plain, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        key = create_key_file(work / "kek.hex")
        raw_key = os.urandom(32)

        runs: dict[str, list[tuple[float, float]]] = {"seal": [], "enc": [], "unseal": [], "dec": []}
        for _ in range(args.reps):
            runs["seal"].append(_timed(lambda: seal_file(plain, work / "sealed.bin", key=key, **BINDING)))
            runs["enc"].append(_timed(plain_encrypt, plain, work / "gcm.bin", raw_key))
            runs["unseal"].append(
                _timed(lambda: unseal_file(work / "sealed.bin", work / "unsealed.bin", key=key, **BINDING))
            )
            runs["dec"].append(_timed(plain_decrypt, work / "gcm.bin", work / "decrypted.bin", raw_key))
        if plain.stat().st_size != size or (work / "unsealed.bin").read_bytes() != plain.read_bytes():
            raise SystemExit("unsealed bytes differ from the original")

    def mb_s(name: str) -> float:
        return round(statistics.median(size / wall / 1e6 for wall, _ in runs[name]), 1)

    def ratio(ours: str, plain_name: str, which: int) -> float:
        return statistics.median(p[which] / o[which] for o, p in zip(runs[ours], runs[plain_name], strict=False))

    seal_r, unseal_r = ratio("seal", "enc", 0), ratio("unseal", "dec", 0)
    print(
        json.dumps(
            {
                "benchmark": "seal_throughput",
                "size_mib": args.size_mib,
                "reps": args.reps,
                "segment_bytes": SEGMENT_SIZE,
                "seal_mb_s": mb_s("seal"),
                "plain_aes_gcm_encrypt_mb_s": mb_s("enc"),
                "seal_ratio": round(seal_r, 3),
                "seal_cpu_ratio": round(ratio("seal", "enc", 1), 3),
                "unseal_mb_s": mb_s("unseal"),
                "plain_aes_gcm_decrypt_mb_s": mb_s("dec"),
                "unseal_ratio": round(unseal_r, 3),
                "unseal_cpu_ratio": round(ratio("unseal", "dec", 1), 3),
                "target_ratio": TARGET,
                "pass": seal_r >= TARGET and unseal_r >= TARGET,
            }
        )
    )


if __name__ == "__main__":
    main()
