"""Keras beside torch: one worker round on the same MLP and data, and weight exchange of a
large Keras model. Prints one JSON object.

* round: `examples/hfl_default_credit.yaml`'s worker round (23-64-32-1 MLP, 8,000 rows,
  2 local epochs, batch 64, SGD lr 0.05 momentum 0.9) through `KerasTrainer.fit` (weights
  in, `model.fit`, weights out: the Keras job's worker) and through the torch job's
  worker (`builtin_trainer`, a TorchTrainer with local SGD), both on one thread. Median of
  5 rounds after one warm-up round; the first round (Keras traces
  and compiles its train step then) is reported apart. The breakdown says where Keras'
  time goes: weights in and out, the steps, and the fixed cost of each `model.fit` call.
* exchange: a Keras model of >= 100 MB in a fresh worker process: the global weights
  arrive as the channel's frames (`enclavefl.net.tensors`, read from a file as from a
  socket), are loaded by name, and the weights go out again as frames. Bytes on the wire
  (tensor bytes of the frames) against the model size; the worker's peak RSS above its
  baseline (model built, nothing received) against the model size.

    .venv/bin/python bench/bench_keras.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ENCLAVEFL_SHARED_DATA", ROOT.parent / "shared" / "data")) / "tabular"
ROUNDS = 5
EPOCHS, BATCH, LR, MOMENTUM = 2, 64, 0.05, 0.9
BIG_WIDTHS = (4096, 4096, 2048, 1024, 1)  # 4096*4096 + 4096*2048 + 2048*1024 + ... floats: ~107 MB


def _default_credit() -> tuple[np.ndarray, np.ndarray]:
    raw = np.genfromtxt(DATA / "default_credit_homo_guest.csv", delimiter=",", names=True)
    names = [n for n in raw.dtype.names if n not in ("id", "y")]
    x = np.stack([raw[n] for n in names], axis=1).astype(np.float32)
    return x, raw["y"].astype(np.float32)


def _median_and_first(run: callable) -> dict[str, float]:
    times = []
    for _ in range(ROUNDS + 1):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return {"first_s": times[0], "median_s": statistics.median(times[1:])}


def bench_round() -> dict[str, object]:
    import keras
    import torch

    from enclavefl.models import keras_mlp, mlp
    from enclavefl.train.keras import KerasTrainer

    torch.set_num_threads(1)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    x, y = _default_credit()
    steps = EPOCHS * -(-len(y) // BATCH)

    keras.utils.set_random_seed(0)
    trainer = KerasTrainer(
        keras_mlp(x.shape[1], [64, 32], 1),
        keras.losses.BinaryCrossentropy(from_logits=True),
        keras.optimizers.SGD(LR, momentum=MOMENTUM),
        (x, y),
        batch_size=BATCH,
        local_epochs=EPOCHS,
    )
    weights = trainer.get_weights()
    state = {"weights": weights, "round": 0}

    def keras_round() -> None:
        state["round"] += 1
        state["weights"] = trainer.fit(state["weights"], {"round": state["round"]}).weights

    keras_times = _median_and_first(keras_round)
    started = time.perf_counter()
    for _ in range(20):
        trainer.set_weights(trainer.get_weights())
    weights_s = (time.perf_counter() - started) / 20
    started = time.perf_counter()  # the fixed cost of one model.fit call: one step's worth of data
    for _ in range(5):
        trainer.model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, epochs=1, verbose=0)
    fit_call_s = (time.perf_counter() - started) / 5

    torch.manual_seed(0)
    from enclavefl.hfl.worker import builtin_trainer

    torch_trainer = builtin_trainer(
        mlp(x.shape[1], [64, 32], 1),
        (torch.from_numpy(x), torch.from_numpy(y)),
        batch_size=BATCH,
        lr=LR,
        momentum=MOMENTUM,
        local_epochs=EPOCHS,
    )
    torch_state = {"weights": torch_trainer.get_weights(), "round": 0}

    def torch_round() -> None:
        torch_state["round"] += 1
        torch_state["weights"] = torch_trainer.fit(torch_state["weights"], {"round": torch_state["round"]}).weights

    torch_times = _median_and_first(torch_round)
    return {
        "model": "mlp 23-64-32-1",
        "rows": len(y),
        "local_epochs": EPOCHS,
        "batch_size": BATCH,
        "steps": steps,
        "keras_backend": keras.backend.backend(),
        "keras_round_s": keras_times["median_s"],
        "keras_first_round_s": keras_times["first_s"],
        "torch_round_s": torch_times["median_s"],
        "torch_first_round_s": torch_times["first_s"],
        "keras_over_torch": keras_times["median_s"] / torch_times["median_s"],
        "keras_breakdown": {
            "weights_in_and_out_s": weights_s,
            "fit_call_overhead_s": fit_call_s,
            "per_step_ms": 1000 * (keras_times["median_s"] - weights_s - fit_call_s) / steps,
            "torch_per_step_ms": 1000 * torch_times["median_s"] / steps,
        },
    }


# -- weight exchange -------------------------------------------------------------------------


def _big_model() -> object:
    import keras

    inputs = keras.Input((BIG_WIDTHS[0],))
    x = inputs
    for i, width in enumerate(BIG_WIDTHS[1:]):
        x = keras.layers.Dense(width, name=f"dense_{i}", kernel_initializer="zeros")(x)
    return keras.Model(inputs, x)


def _write_frames(path: Path) -> int:
    """The server's side: the global weights as the channel's frames, length-prefixed, in a file."""
    from enclavefl.net.tensors import Message, encode_message, serialize_frame
    from enclavefl.train.keras import get_weights

    weights = {
        n: np.random.default_rng(0).standard_normal(w.shape).astype(w.dtype)
        for n, w in get_weights(_big_model()).items()
    }
    with open(path, "wb") as out:
        for frame in encode_message(Message({"version": 1}, weights), method="hfl.wait"):
            raw = serialize_frame(frame)
            out.write(len(raw).to_bytes(8, "little") + raw)
    return sum(w.nbytes for w in weights.values())


def _worker(path: str) -> None:
    """The worker's side, in its own process: receive, load, send; peak RSS sampled every 2 ms."""
    import psutil

    from enclavefl.net.tensors import Chunk, Message, decode_message, encode_message, parse_frame, serialize_frame
    from enclavefl.train.keras import get_weights, set_weights

    model = _big_model()
    model_bytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    def frames() -> object:
        with open(path, "rb") as source:
            while head := source.read(8):
                yield parse_frame(source.read(int.from_bytes(head, "little")))

    started = time.perf_counter()
    _, received = decode_message(frames())
    received_bytes = sum(np.asarray(t).nbytes for t in received.tensors.values())
    set_weights(model, received.tensors)
    del received
    sent_bytes = frame_bytes = 0
    for frame in encode_message(Message({"version": 2}, get_weights(model)), method="hfl.push"):
        frame_bytes += len(serialize_frame(frame))  # what gRPC is handed, one frame at a time
        if isinstance(frame, Chunk):
            sent_bytes += len(frame.data)
    elapsed = time.perf_counter() - started
    done.set()
    sampler.join()
    print(
        json.dumps(
            {
                "model_bytes": model_bytes,
                "bytes_received": received_bytes,
                "bytes_sent": sent_bytes,
                "frame_bytes_sent": frame_bytes,
                "peak_rss_above_baseline_bytes": peak[0] - baseline,
                "peak_over_model_size": (peak[0] - baseline) / model_bytes,
                "exchange_s": elapsed,
            }
        )
    )


def bench_exchange() -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frames"
        size = _write_frames(path)
        done = subprocess.run(
            [sys.executable, __file__, "--worker", str(path)], capture_output=True, text=True, check=True, timeout=600
        )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["server_weights_bytes"] = size
    result["bytes_on_wire_equal_model_size"] = result["bytes_sent"] == result["bytes_received"] == result["model_bytes"]
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        print(json.dumps({"round": bench_round(), "exchange": bench_exchange()}, indent=2))
