"""Benchmark: tokens/s of the perplexity pass against a bare forward pass over the same windows.

The bare forward is the floor: `model(input_ids=batch).logits` for every batch, nothing else. The perplexity pass
adds the shifted cross-entropy in fp32 and the fp64 accumulation. Target: the perplexity pass runs at >= 90% of the
bare forward's tokens/s. Both are timed batch by batch, alternately (in both orders), best of `--repeats` each,
after a warm-up
batch, so that a shared machine's noise hits both alike. On a CPU the process's CPU time is reported too, and
`meets_target` uses it there: it is what a shared machine does not distort (wall-time ratios on a loaded
2-core box swing by ±30%).

    python bench/evaluate.py [--model smollm2-135m] [--data embedded:wiki-eval] [--seqlen 1024] [--windows 4]
                             [--batch-size 2] [--device auto] [--dtype auto] [--repeats 2]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall time, and this process's CPU time: on a shared CPU machine the CPU time of the two passes is the
    stable comparison (other processes stretch the wall time of whichever pass they overlap)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Clock:
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


@torch.no_grad()
def bare_forward(model: torch.nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device) -> None:
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        del logits


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="embedded:wiki-eval")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from perp.config import TextSourceConfig
    from perp.data import evaluation_set
    from perp.evaluate.perplexity import perplexity
    from perp.models import load_model

    loaded = load_model(args.model, args.device, args.dtype)
    model, device = loaded.model, loaded.device
    windows = evaluation_set(TextSourceConfig(source=args.data, seqlen=args.seqlen, max_windows=args.windows),
                             loaded.tokenizer)
    ids = windows.ids
    tokens = windows.num_tokens

    # Warm-up (allocator, kernels), then batch by batch: the bare forward and the perplexity pass on the same
    # windows, alternately, best of --repeats each. Alternating per batch keeps a shared machine's drift out.
    bare_forward(model, ids[: args.batch_size], args.batch_size, device)
    TokenSet = type(windows)
    best = {"forward": [0.0, 0.0], "perplexity": [0.0, 0.0]}  # summed over batches: [wall, cpu]
    nll_sum, scored = 0.0, 0
    for start in range(0, ids.shape[0], args.batch_size):
        chunk = TokenSet(ids[start:start + args.batch_size], windows.source)
        batch_best = {"forward": [math.inf, math.inf], "perplexity": [math.inf, math.inf]}
        for repeat in range(args.repeats):
            order = ("forward", "perplexity") if repeat % 2 == 0 else ("perplexity", "forward")  # no order bias
            for mode in order:
                with Clock(device) as clock:
                    if mode == "forward":
                        bare_forward(model, chunk.ids, args.batch_size, device)
                    else:
                        result = perplexity(model, chunk, args.batch_size)
                batch_best[mode] = [min(batch_best[mode][0], clock.wall), min(batch_best[mode][1], clock.cpu)]
        for key in best:
            best[key] = [best[key][0] + batch_best[key][0], best[key][1] + batch_best[key][1]]
        nll_sum += result.nll * result.tokens
        scored += result.tokens
    ppl = math.exp(nll_sum / scored)
    forward_s, ppl_s = best["forward"][0], best["perplexity"][0]
    forward_cpu, ppl_cpu = best["forward"][1], best["perplexity"][1]
    report = {
        "model": args.model,
        "device": str(device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
        "data": args.data,
        "windows": windows.num_windows,
        "seqlen": windows.seqlen,
        "batch_size": args.batch_size,
        "tokens": tokens,
        "repeats": args.repeats,
        "bare_forward_s": round(forward_s, 4),
        "perplexity_s": round(ppl_s, 4),
        "bare_forward_tokens_per_s": round(tokens / forward_s, 1),
        "perplexity_tokens_per_s": round(tokens / ppl_s, 1),
        "ratio": round(forward_s / ppl_s, 4),
        "bare_forward_cpu_s": round(forward_cpu, 4),
        "perplexity_cpu_s": round(ppl_cpu, 4),
        "cpu_time_ratio": round(forward_cpu / ppl_cpu, 4) if device.type == "cpu" else None,
        "target_ratio": 0.9,
        "meets_target": (forward_cpu / ppl_cpu if device.type == "cpu" else forward_s / ppl_s) >= 0.9,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "ppl": ppl,
    }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
