"""Peak memory growth of a call: how much more memory it needed at its peak than before.

On CUDA, the caching allocator's own peak counter. On the CPU, the tensor allocations that
the PyTorch profiler records, replayed in order (allocations minus frees): this counts every
tensor of the call, ours and PyTorch's, and not the few small std::vector scratch rows of
the C++ kernels.
"""
import torch
from torch.profiler import ProfilerActivity, profile


def peak_memory_growth(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # An op's event also counts its children's allocations: take each event's own.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0),
                    key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak
