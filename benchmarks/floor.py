"""The floor of one forward + backward of the loss at each config of ``bench_loss.py``.

Counts the work of our kernels (4 projection passes: the forward, the recomputation in the
backward, the target gradient and the regressor gradient; the maps read and written),
measures the device's matmul rate and copy bandwidth, and prints
``floor = max(FLOPs / rate, bytes / bandwidth)`` for each config that runs here.

    python benchmarks/floor.py                 # the configs of this machine's devices
    python benchmarks/floor.py --json floor.json
"""
import argparse
import json
import time

import torch

from bench_loss import CONFIGS

PASSES = 4  # forward, recomputation of D, target gradient, regressor gradient


def work(config):
    """FLOPs and bytes that any implementation of the fused op must spend on ``config``."""
    _, dtype, batch, source, target = CONFIGS[config]
    rows = sum(c for c, _ in source)  # every source layer pairs with every target layer
    flops = PASSES * 2 * batch * sum(rows * c * h * h for c, h in target)
    size = torch.empty((), dtype=dtype).element_size()
    target_bytes = batch * sum(c * h * h for c, h in target) * size
    source_bytes = batch * sum(c * h * h for c, h in source) * size
    # T read three times (forward, recomputation, regressor gradient) and its gradient
    # written once; S read twice.
    return flops, 4 * target_bytes + 2 * source_bytes


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
    report = {"torch": torch.__version__, "devices": {}, "configs": {}}
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
        flops, moved = work(config)
        compute, memory = flops / facts[key], moved / facts["copy_bytes_per_s"]
        report["configs"][config] = {"gflop": flops / 1e9, "mbytes": moved / 1e6,
                                     "compute_ms": compute * 1e3, "memory_ms": memory * 1e3,
                                     "floor_ms": max(compute, memory) * 1e3}
        print(f"{config}: {flops / 1e9:.2f} GFLOP at {facts[key] / 1e12:.1f} TFLOP/s = "
              f"{compute * 1e3:.2f} ms; {moved / 1e6:.0f} MB at "
              f"{facts['copy_bytes_per_s'] / 1e9:.0f} GB/s = {memory * 1e3:.2f} ms; "
              f"floor {max(compute, memory) * 1e3:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
