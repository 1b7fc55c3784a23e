"""Recovery benchmarks: speed and memory of each method against `full`, and the quality targets.

    python bench/recover.py speed   [--model smollm2-135m] [--methods norm,masklora,...] [--steps 3]
                                    [--batch-size 2] [--seqlen 256] [--rounds 2] [--threads N]
    python bench/recover.py speed   --llama7b-shape            # only the 8-layer LLaMA-2-7B-shape random model
                                    (on a GPU, `speed` runs it after SmolLM2 anyway, at 4 x 512)
    python bench/recover.py quality --start DIR --method masklora --steps 100 --lr 1e-3 [--eval FILE]

`speed` runs every method in its own subprocess (so peak memory is per method: CUDA's allocator peak on GPU,
the peak resident set of the process on CPU, both measured from just after the model is loaded), interleaved
over `--rounds` rounds; tokens/s is the best round's (the CPU may be shared, the best round is the least
disturbed one). On a shared CPU, run it with `--threads 1`: the CPU seconds per step of a single-threaded
process hardly depend on what else runs, so `cpu_throughput_vs_full` is the robust speed ratio there. The
model is magnitude-pruned to 50% per matrix in memory first, so masks exist. It prints one JSON object with,
per method, tokens/s, peak memory, and both as ratios to `full` at the same batch and length.

`quality` runs `perp.recover.run_recover` on an already pruned checkpoint, evaluates perplexity before and
after on `--eval` (default: WikiText-2 test, first 32 windows of 1024 tokens) and reports the closed fraction of
the log-perplexity gap to the dense model: (ln ppl_before − ln ppl_after) / (ln ppl_before − ln ppl_dense).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
C4 = SHARED / "c4" / "c4_en_sample.jsonl"
WIKI_TEST = SHARED / "wikitext2" / "wiki.test.raw"
DENSE_PPL = {"smollm2-135m": 23.94}  # WikiText-2 test, first 32 windows of 1024 tokens (measured by `perp eval ppl`)


# --------------------------------------------------------------------------------------------- speed


def _llama7b_shape(layers: int = 8):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    return config, LlamaForCausalLM


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    """One method, one process: load, prune 50% per matrix, attach, train, measure."""
    import torch

    from perp.config import load_params
    from perp.models.families import adapter_for, count_parameters
    from perp.recover import Settings, attach, model_scope
    from perp.recover.memory import PeakMemory
    from perp.recover.train import train_end2end

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.llama7b_shape:
        config, model_class = _llama7b_shape(args.layers)
        with torch.device(device):
            torch.manual_seed(0)
            default = torch.bfloat16 if device.type == "cuda" else torch.float32
            model = model_class(config).to(default if args.dtype == "auto" else getattr(torch, args.dtype))
        dtype = next(model.parameters()).dtype
    else:
        from perp.models import load_model

        loaded = load_model(args.model, str(device), args.dtype)
        model, dtype = loaded.model, loaded.dtype
    family = adapter_for(model)
    with torch.no_grad():
        for _, linear in family.named_decoder_linears(model):
            weight = linear.weight
            magnitudes = weight.abs().float().flatten()
            # kthvalue runs one CUDA block per slice (seconds for 45M entries); a sort is one fast kernel there
            threshold = (magnitudes.sort().values[weight.numel() // 2 - 1] if magnitudes.is_cuda
                         else magnitudes.kthvalue(weight.numel() // 2).values)
            weight.masked_fill_(weight.abs() <= threshold.to(weight.dtype), 0.0)
    total = count_parameters(model)
    recover = load_params(None, [f"recover.method={args.method}", f"recover.steps={args.steps + 1}",
                                 f"recover.batch_size={args.batch_size}", f"recover.seqlen={args.seqlen}",
                                 f"recover.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
                                 "recover.lr=1e-5"]).recover
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch_size, args.seqlen), generator=generator)
               for _ in range(args.steps + 1)]
    meter = PeakMemory(device)
    meter.start()
    attachment = attach(model_scope(model, family), recover.methods, Settings(rank=args.rank, alpha=2 * args.rank))
    step_times: list[float] = []
    cpu_times: list[float] = []
    last = [time.perf_counter(), time.process_time()]

    def on_step(step: int, loss: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now, cpu = time.perf_counter(), time.process_time()
        step_times.append(now - last[0])
        cpu_times.append(cpu - last[1])
        last[0], last[1] = now, cpu

    result = train_end2end(model, attachment, iter(batches), recover, device, dtype, on_step)
    peak = meter.stop()
    timed = step_times[1:]  # the first step pays one-time costs (allocator, kernels, optimizer state)
    step = sorted(timed)[len(timed) // 2]
    cpu_step = sorted(cpu_times[1:])[len(timed) // 2]
    return {
        "method": args.method, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "trainable_params": attachment.trainable_params, "total_params": total,
        "trainable_fraction": attachment.trainable_params / total,
        "step_seconds_median": step, "step_seconds": timed,
        "tokens_per_second": args.batch_size * args.seqlen / step,
        "cpu_seconds_per_step": cpu_step,
        "tokens_per_cpu_second": args.batch_size * args.seqlen / cpu_step,
        "peak_memory_bytes": peak, "peak_memory_kind": meter.kind, "baseline_bytes": meter.baseline,
        "peak_above_baseline_bytes": max(0, peak - meter.baseline),
        "optimizer_state_bytes": result.optimizer_state_bytes, "threads": torch.get_num_threads(),
    }


def speed(args: argparse.Namespace) -> dict[str, Any]:
    methods = args.methods.split(",")
    if "full" not in methods:
        methods.append("full")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for method in methods:
            command = [sys.executable, __file__, "_worker", "--method", method, *_forward(args)]
            done = subprocess.run(command, capture_output=True, text=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if done.returncode != 0:
                raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
            runs[method].append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = {m: min(r, key=lambda run: run["step_seconds_median"]) for m, r in runs.items()}
    full = best["full"]
    cpu = {m: min(run["cpu_seconds_per_step"] for run in r) for m, r in runs.items()}
    summary = {}
    for method, run in best.items():
        summary[method] = {
            **{k: run[k] for k in ("trainable_params", "trainable_fraction", "tokens_per_second",
                                   "step_seconds_median", "peak_memory_bytes",
                                   "baseline_bytes", "peak_above_baseline_bytes", "optimizer_state_bytes")},
            "throughput_vs_full": run["tokens_per_second"] / full["tokens_per_second"],
            "cpu_seconds_per_step_best": cpu[method],
            "cpu_throughput_vs_full": cpu["full"] / cpu[method],
            "memory_vs_full": run["peak_memory_bytes"] / full["peak_memory_bytes"],
            "memory_above_baseline_vs_full":
                run["peak_above_baseline_bytes"] / max(1, full["peak_above_baseline_bytes"]),
            "rounds_step_seconds": [r["step_seconds_median"] for r in runs[method]],
        }
    return {
        "benchmark": "recover-speed",
        "model": f"llama-2-7b-shape-{args.layers}-layers (random)" if args.llama7b_shape else args.model,
        "device": full["device"], "dtype": full["dtype"], "threads": full["threads"],
        "batch_size": args.batch_size, "seqlen": args.seqlen, "rank": args.rank, "timed_steps": args.steps,
        "gradient_checkpointing": args.gradient_checkpointing, "peak_memory_kind": full["peak_memory_kind"],
        "methods": summary,
        "targets": {m: {"memory_le_60pct_of_full": s["memory_vs_full"] <= 0.60,
                        "memory_above_baseline_le_60pct_of_full": s["memory_above_baseline_vs_full"] <= 0.60,
                        "throughput_ge_1.3x_full": s["throughput_vs_full"] >= 1.3,
                        "cpu_throughput_ge_1.3x_full": s["cpu_throughput_vs_full"] >= 1.3}
                    for m, s in summary.items() if m in ("norm", "masklora")},
    }


def _forward(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--seqlen", str(args.seqlen), "--rank", str(args.rank), "--device", args.device,
           "--layers", str(args.layers), "--threads", str(args.threads or 0), "--dtype", args.dtype]
    if args.llama7b_shape:
        out.append("--llama7b-shape")
    if args.gradient_checkpointing:
        out.append("--gradient-checkpointing")
    return out


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------- quality


def quality(args: argparse.Namespace) -> dict[str, Any]:
    from perp.config import load_params
    from perp.recover import run_recover

    overrides = [
        f"recover.method={args.method}", f"recover.mode={args.mode}", f"recover.steps={args.steps}",
        f"recover.lr={args.lr}", f"recover.batch_size={args.batch_size}", f"recover.seqlen={args.seqlen}",
        f"recover.rank={args.rank}", f"recover.alpha={args.alpha}", f"recover.seed={args.seed}",
        f"recover.data.source={args.data}", f"recover.data.nsamples={args.nsamples}",
        f"data.evaluation.source={args.eval}", "data.evaluation.seqlen=1024",
        f"data.evaluation.max_windows={args.windows}", "evaluate.batch_size=1", f"model.device={args.device}",
    ]
    config = load_params(None, overrides + list(args.set or []))
    out = Path(args.out or tempfile.mkdtemp(prefix="perp-recover-bench-"))
    try:
        report = run_recover(config, args.start, out, dense=args.dense)
    finally:
        if not args.out:  # the recovered checkpoint is only measured, not kept
            shutil.rmtree(out, ignore_errors=True)
    dense_ppl = args.dense_ppl or DENSE_PPL.get(args.dense or "", None)
    closed = None
    if dense_ppl:
        gap = math.log(report["ppl_before"]) - math.log(dense_ppl)
        closed = (math.log(report["ppl_before"]) - math.log(report["ppl_after"])) / gap
    return {
        "benchmark": "recover-quality", "start": args.start, "method": args.method, "mode": args.mode,
        "steps": args.steps, "batch_size": args.batch_size, "seqlen": args.seqlen, "lr": args.lr, "rank": args.rank,
        "eval": {"source": args.eval, "windows": args.windows, "seqlen": 1024},
        "ppl_dense": dense_ppl, "ppl_before": report["ppl_before"], "ppl_after": report["ppl_after"],
        "log_gap_closed": closed, "trainable_params": report["trainable_params"],
        "trainable_fraction": report["trainable_fraction"], "train_seconds": report["seconds"],
        "tokens_per_second": report["tokens_per_second"], "peak_memory_bytes": report["peak_memory_bytes"],
        "data_sha256": report["data_sha256"], "loss_first_last": [report["loss_curve"][0], report["loss_curve"][-1]],
        "blocks": report.get("blocks"), "out": args.out,
    }


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("speed", "_worker"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--methods", default="norm,masklora,scalelora,lora,full")
        p.add_argument("--method", default="norm")
        p.add_argument("--steps", type=int, default=3, help="timed steps (one more untimed warm-up step)")
        p.add_argument("--batch-size", type=int, default=2)
        p.add_argument("--seqlen", type=int, default=256)
        p.add_argument("--rank", type=int, default=16)
        p.add_argument("--rounds", type=int, default=2)
        p.add_argument("--device", default="auto")
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
        p.add_argument("--gradient-checkpointing", action="store_true")
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                       help="model weights' dtype (auto: bf16 on CUDA, fp32 on CPU); a half dtype trains under "
                            "autocast with fp32 masters of the trainable parameters")
        p.add_argument("--llama7b-shape", action="store_true", help="8-layer LLaMA-2-7B-shape random model")
        p.add_argument("--layers", type=int, default=8)
        p.add_argument("--no-gpu-shape", action="store_true",
                       help="on a GPU, do not also run the 8-layer LLaMA-2-7B-shape model (4 x 512)")
    q = sub.add_parser("quality")
    q.add_argument("--start", required=True, help="pruned checkpoint")
    q.add_argument("--dense", default="smollm2-135m")
    q.add_argument("--dense-ppl", type=float, default=None, help="dense perplexity on --eval (default: known value)")
    q.add_argument("--method", default="masklora")
    q.add_argument("--mode", default="end2end")
    q.add_argument("--steps", type=int, default=100)
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--batch-size", type=int, default=2)
    q.add_argument("--seqlen", type=int, default=256)
    q.add_argument("--rank", type=int, default=16)
    q.add_argument("--alpha", type=float, default=32.0)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--data", default=str(C4))
    q.add_argument("--nsamples", type=int, default=256)
    q.add_argument("--eval", default=str(WIKI_TEST))
    q.add_argument("--windows", type=int, default=32)
    q.add_argument("--device", default="auto")
    q.add_argument("--out", default=None)
    q.add_argument("--set", "-S", action="append", help="extra dotted config override")
    args = parser.parse_args()
    if args.command == "_worker":
        print(json.dumps(_worker(args)))
    elif args.command == "speed":
        results = [speed(args)]
        if not args.llama7b_shape and not args.no_gpu_shape and _cuda_available():
            results.append(speed(argparse.Namespace(**{**vars(args), "llama7b_shape": True, "batch_size": 4,
                                                        "seqlen": 512})))
        print(json.dumps(results[0] if len(results) == 1 else {"runs": results}, indent=2))
    else:
        print(json.dumps(quality(args), indent=2))


if __name__ == "__main__":
    main()
