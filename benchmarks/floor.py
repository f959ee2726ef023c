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
    python benchmarks/floor.py --against-ours 10   # ours / floor, in interleaved rounds

``--against-ours ROUNDS`` measures, in each round, the matmul rate and then our fused step,
the eager reference and torch.compile of it on the "cifar" config (median of 5 each), and
prints ours over the floor and the references over ours: a shared host's drift moves them
alike within a round, where separate runs of this script and of ``bench_loss.py`` compare
different moments. It runs with glibc keeping
freed memory (``l2t_fast.retain_freed_memory``), as ``l2t-fast`` runs, unless
``--default-malloc``.
"""
import argparse
import json
import statistics
import time

import torch

import history
from bench_loss import CONFIGS, forward_backward, loss_function, make_inputs
from l2t_fast.host_memory import retain_freed_memory

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


def _median_step(fn, inputs, steps=6):
    """Median seconds of ``steps - 1`` forward + backward steps after one warm-up step."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        forward_backward(fn, inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def against_ours(rounds, config="cifar"):
    """Per round: the matmul rate, then our fused step, the eager reference and
    torch.compile of it (median of 5 steps each); ours over the three-pass floor and the
    references over ours, per round and as the median of the rounds."""
    inputs = make_inputs(config)
    implementations = {name: loss_function(name)
                       for name in ("cpu", "reference", "reference-compiled")}
    forward_backward(implementations["reference-compiled"], inputs)  # compile outside rounds
    flops, _ = work(config, PASSES["three-pass"])
    ratios = {"floor": [], "reference": [], "reference-compiled": []}
    for index in range(rounds):
        floor = flops / matmul_rate(torch.device("cpu"), CONFIGS[config][1])
        seconds = {name: _median_step(fn, inputs) for name, fn in implementations.items()}
        ours = seconds["cpu"]
        ratios["floor"].append(ours / floor)
        for name in ("reference", "reference-compiled"):
            ratios[name].append(seconds[name] / ours)
        print(f"round {index + 1}: ours {ours * 1e3:.1f} ms, three-pass floor "
              f"{floor * 1e3:.1f} ms ({ratios['floor'][-1]:.2f}x the floor); reference "
              f"{seconds['reference'] * 1e3:.1f} ms ({ratios['reference'][-1]:.2f}x ours), "
              f"compiled {seconds['reference-compiled'] * 1e3:.1f} ms "
              f"({ratios['reference-compiled'][-1]:.2f}x ours)")
    for name, label in (("floor", "ours / three-pass floor"), ("reference", "reference / ours"),
                        ("reference-compiled", "torch.compile(reference) / ours")):
        values = ratios[name]
        print(f"{label}, median of {rounds} rounds: {statistics.median(values):.2f}x "
              f"(range {min(values):.2f}-{max(values):.2f})")
    history.append([
        dict(kernel=f"loss/{config}", implementation="cpu", mode="forward+backward",
             metric="ratio_to_three_pass_floor", value=f"{statistics.median(ratios['floor']):.6g}"),
        *[dict(kernel=f"loss/{config}", implementation=name, mode="forward+backward",
               metric="time_ratio_to_ours_interleaved",
               value=f"{statistics.median(ratios[name]):.6g}")
          for name in ("reference", "reference-compiled")]])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--against-ours", type=int, metavar="ROUNDS",
                        help="our fused step against the floor and the references, in interleaved rounds")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's malloc defaults (no retain_freed_memory)")
    args = parser.parse_args()
    retained = not args.default_malloc and retain_freed_memory()
    if args.against_ours:
        print("host allocator: " + ("freed blocks retained" if retained else "glibc defaults"))
        return against_ours(args.against_ours)
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
