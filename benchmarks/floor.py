"""The floor of one forward + backward of the loss at each config of ``bench_loss.py``.

Counts the work of a training step's forward + backward, measures the device's matmul
rate and copy bandwidth, and prints ``floor = max(FLOPs / rate, bytes / bandwidth)`` for
each config that runs here, twice: with 4 projection passes (the forward, the
recomputation of D in the backward, the target gradient, the regressor gradient: the
separate forward and backward ops) and with 3 (the fused op ``channel_errors_with_grads``
makes E and the gradients from the same blocks of D). Appends the numbers to the run
history (``history.py``).

    python benchmarks/floor.py                 # the configs of this machine's devices
    python benchmarks/floor.py --json floor.json
"""
import argparse
import json
import time

import torch

import history
from bench_loss import CONFIGS

# Projection passes: separate forward and backward ops (forward, recomputation of D, target
# gradient, regressor gradient), and the fused op (D once, then the two gradients).
PASSES = {"four-pass": 4, "three-pass": 3}


def work(config, passes):
    """FLOPs and bytes of ``passes`` projection passes on ``config``."""
    _, dtype, batch, source, target = CONFIGS[config]
    rows = sum(c for c, _ in source)  # every source layer pairs with every target layer
    flops = passes * 2 * batch * sum(rows * c * h * h for c, h in target)
    size = torch.empty((), dtype=dtype).element_size()
    target_bytes = batch * sum(c * h * h for c, h in target) * size
    source_bytes = batch * sum(c * h * h for c, h in source) * size
    # T read by every pass but the target gradient's and its gradient written once; S read
    # by every pass that makes D.
    makes_d = passes - 2
    return flops, passes * target_bytes + makes_d * source_bytes


def _time(fn, device, repeats):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def matmul_rate(device, dtype, size=4096):
    """FLOP/s of a square matmul (TF32 allowed for float32 on CUDA, as our kernels use)."""
    if device.type == "cpu":
        size = 2048
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        seconds = _time(lambda: a @ b, device, 20 if device.type == "cuda" else 5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    return 2 * size ** 3 / seconds


def copy_bandwidth(device):
    """Bytes/s of a device-to-device copy (each byte read once and written once)."""
    megabytes = 1024 if device.type == "cuda" else 256
    src = torch.empty(megabytes * 2 ** 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), device, 20 if device.type == "cuda" else 5)
    return 2 * src.numel() / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {"torch": torch.__version__, "host": history.host(), "devices": {},
              "configs": {}}
    rows = []
    for name in devices:
        device = torch.device(name)
        report["devices"][name] = {
            "name": torch.cuda.get_device_name() if name == "cuda" else "cpu",
            "copy_bytes_per_s": copy_bandwidth(device)}
    for config, (device, dtype, *_) in CONFIGS.items():
        if device not in devices:
            continue
        facts = report["devices"][device]
        key = f"matmul_flops_per_s_{str(dtype).removeprefix('torch.')}"
        if key not in facts:
            facts[key] = matmul_rate(torch.device(device), dtype)
            rows.append(dict(kernel="matmul-2048" if device == "cpu" else "matmul-4096",
                             implementation="torch", mode=f"{device} {dtype}",
                             metric="gflop_per_s", value=f"{facts[key] / 1e9:.6g}"))
        for name, passes in PASSES.items():
            flops, moved = work(config, passes)
            compute, memory = flops / facts[key], moved / facts["copy_bytes_per_s"]
            floor = max(compute, memory)
            report["configs"].setdefault(config, {})[name] = {
                "gflop": flops / 1e9, "mbytes": moved / 1e6, "compute_ms": compute * 1e3,
                "memory_ms": memory * 1e3, "floor_ms": floor * 1e3}
            rows.append(dict(kernel=f"loss/{config}", implementation=f"floor-{name}",
                             mode="forward+backward", metric="median_ms",
                             value=f"{floor * 1e3:.6g}"))
            print(f"{config} {name}: {flops / 1e9:.2f} GFLOP at {facts[key] / 1e9:.0f} "
                  f"GFLOP/s = {compute * 1e3:.2f} ms; {moved / 1e6:.0f} MB at "
                  f"{facts['copy_bytes_per_s'] / 1e9:.0f} GB/s = {memory * 1e3:.2f} ms; "
                  f"floor {floor * 1e3:.2f} ms")
    history.append(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
