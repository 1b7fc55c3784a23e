"""Pruning engine benchmark: one JSON line per job on stdout.

Each line: model, device, method, pattern, granularity, wall time of the pruning (`prune_s`: capture, statistics,
solve, error, propagate), the whole job (`job_s`: load + calibration + prune + save, as `perp prune` runs it),
the dense forward pass over the same calibration set (`dense_forward_s`, the floor), tokens/s, peak memory,
achieved sparsity, and optionally WikiText-2 perplexity of the pruned checkpoint.

Models:
- `smollm2-135m` (default): the embedded SmolLM2 through `run_prune`, calibrated on real text;
- `llama2-7b-shape`: random weights with LLaMA-2-7B layer shapes (hidden 4096, intermediate 11008, 32 heads,
  vocabulary 32000), 8 decoder layers, random calibration tokens (default 128 × 2048), bf16, through
  `prune_model`. Needs a CUDA device unless `--device cpu` is forced (very slow); otherwise it prints a skip line.

Examples:
    python bench/prune.py --calib ../shared/data/c4/c4_en_sample.jsonl \\
        --eval ../shared/data/wikitext2/wiki.test.raw --jobs wanda,sparsegpt,wanda:2:4,magnitude:unstructured:matrix
    python bench/prune.py --model llama2-7b-shape --jobs wanda,sparsegpt
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import perp  # noqa: F401 - first, so its OpenBLAS setting (perp/runtime.py) is in place before torch loads numpy
import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CALIB = REPO.parent / "shared" / "data" / "c4" / "c4_en_sample.jsonl"


def parse_job(text: str) -> tuple[str, str, str | None]:
    """METHOD[:PATTERN[:GRANULARITY]], PATTERN may itself be N:M, e.g. wanda:2:4 or magnitude:unstructured:matrix."""
    parts = text.split(":")
    method, rest = parts[0], parts[1:]
    granularity = None
    if rest and rest[-1] in ("row", "matrix"):
        granularity = rest.pop()
    pattern = ":".join(rest) if rest else "unstructured"
    return method, pattern, granularity


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
    sys.stdout.flush()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prune_seconds(timings: dict[str, float]) -> float:
    phases = ("capture", "onload", "stats", "solve", "error", "propagate", "forward", "offload")
    return sum(timings.get(key, 0.0) for key in phases)


@torch.no_grad()
def dense_forward(model: torch.nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device,
                  decoder_only: bool = False) -> float:
    """Seconds for one forward pass over `ids` in micro-batches (logits computed, then dropped)."""
    from perp.runtime import reuse_freed_memory

    body = model.get_decoder() if decoder_only else model
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with reuse_freed_memory(device.type == "cpu"):  # the same allocator policy as the engine's
        for batch in ids.split(batch_size):
            out = body(input_ids=batch.to(device), use_cache=False)
            del out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------- SmolLM2


def bench_smollm2(args: argparse.Namespace) -> None:
    from perp.config import load_params
    from perp.data import calibration_set, evaluation_set
    from perp.config import TextSourceConfig
    from perp.evaluate import perplexity
    from perp.models import load_model
    from perp.prune import default_batch_size, run_prune

    calib_source = str(Path(args.calib).resolve())
    base = [f"model.name={args.model}", f"model.device={args.device}", f"data.calibration.source={calib_source}",
            f"data.calibration.nsamples={args.nsamples}", f"data.calibration.seqlen={args.seqlen}",
            f"data.calibration.seed={args.seed}"]
    config = load_params(None, base)
    loaded = load_model(config.model.name, config.model.device, config.model.dtype)
    calib = calibration_set(config.data.calibration, loaded.tokenizer)
    batch = args.batch_size or default_batch_size(calib.seqlen, loaded.device)
    dense_forward(loaded.model, calib.ids[:batch], batch, loaded.device)  # warm-up
    cpu_started = time.process_time()
    floor = dense_forward(loaded.model, calib.ids, batch, loaded.device)
    floor_cpu = time.process_time() - cpu_started
    floor_decoder = dense_forward(loaded.model, calib.ids, batch, loaded.device, decoder_only=True)
    evaluation = None
    if args.eval:
        evaluation = evaluation_set(TextSourceConfig(source=str(Path(args.eval).resolve()), seqlen=args.eval_seqlen,
                                                     max_windows=args.eval_windows), loaded.tokenizer)
        if args.eval_dense:
            result = perplexity(loaded.model, evaluation, batch_size=4)
            emit({"model": args.model, "job": "dense", "ppl": round(result.ppl, 4), "eval_s": round(result.seconds, 2),
                  "eval_windows": evaluation.num_windows, "eval_seqlen": evaluation.seqlen})
    del loaded
    gc.collect()

    out_root = Path(args.out or tempfile.mkdtemp(prefix="perp-bench-"))
    try:
        for job in args.jobs.split(","):
            method, pattern, granularity = parse_job(job)
            sets = [*base, f"prune.method={method}", f"prune.pattern={pattern}", f"prune.sparsity={args.sparsity}"]
            if granularity:
                sets.append(f"prune.granularity={granularity}")
            if args.owl_lambda:
                sets += [f"prune.owl_lambda={args.owl_lambda}", f"prune.owl_m={args.owl_m}"]
            job_config = load_params(None, sets)
            out = out_root / job.replace(":", "_")
            started, cpu_started = time.perf_counter(), time.process_time()
            report = run_prune(job_config, out, calib=calib, compute_dtype=args.compute_dtype, batch_size=batch,
                               error_tokens=args.error_tokens, sequential=args.sequential)
            job_s, job_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
            prune_s = prune_seconds(report["timings"])
            record = {
                "model": args.model, "device": report["engine"]["device"], "method": method, "pattern": pattern,
                "granularity": job_config.prune.granularity, "compute_dtype": report["engine"]["compute_dtype"],
                "sequential": report["engine"]["sequential"], "owl_lambda": args.owl_lambda,
                "threads": torch.get_num_threads(), "tokens": calib.num_tokens,
                "prune_s": round(prune_s, 2), "job_s": round(job_s, 2), "job_cpu_s": round(job_cpu_s, 2),
                "dense_forward_s": round(floor, 2), "dense_forward_cpu_s": round(floor_cpu, 2),
                "dense_decoder_forward_s": round(floor_decoder, 2),
                "prune_over_forward": round(prune_s / floor, 3),
                "job_cpu_over_forward_cpu": round(job_cpu_s / floor_cpu, 3),
                "tokens_per_s": round(calib.num_tokens / prune_s, 1),
                "peak_memory_bytes": report["peak_memory_bytes"],
                "achieved_sparsity": round(report["achieved_sparsity"], 6),
                "mean_rel_error": report["mean_rel_error"],
                "timings": report["timings"],
                "load_avg": os.getloadavg()[0],
            }
            if evaluation is not None:
                eval_device = "cpu" if args.device == "auto" and not torch.cuda.is_available() else args.device
                pruned = load_model(str(out), eval_device)
                result = perplexity(pruned.model, evaluation, batch_size=4)
                record.update(ppl=round(result.ppl, 4), eval_s=round(result.seconds, 2))
                del pruned
            emit(record)
            if not args.out:
                shutil.rmtree(out, ignore_errors=True)
            gc.collect()
    finally:
        if not args.out:  # a checkpoint is 0.5-2 GB per job: measured, then removed
            shutil.rmtree(out_root, ignore_errors=True)


# --------------------------------------------------------------------------------------------- 7B shapes


def build_7b_shape(layers: int, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         tie_word_embeddings=False, rms_norm_eps=1e-5)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def warm_up_methods(model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace, device: torch.device,
                    batch: int) -> None:
    """Prune the first layer once per job on a few windows, untimed, then restore it: the first use of a kernel
    (sorts, cuSOLVER and triangular-solve handles) costs up to a second on a GPU, which is not pruning."""
    from perp.config import parse_pattern
    from perp.models.families import LLAMA
    from perp.prune import EngineOptions, create_method, plan_pruning, prune_model
    from perp.prune.engine import resolve_sequential
    from perp.prune.patterns import PruneSpec

    if device.type != "cuda":
        return
    sequential = resolve_sequential(args.sequential, model, ids)  # the mode the timed jobs will run
    layer = LLAMA.layers(model)[0]
    saved = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    for job in dict.fromkeys(args.jobs.split(",")):
        method_name, pattern, granularity = parse_job(job)
        spec = PruneSpec(sparsity=args.sparsity, nm=parse_pattern(pattern), granularity=granularity or "row")
        plans = plan_pruning(model, LLAMA, ["*"], [], spec)[:1]
        prune_model(model, LLAMA, create_method(method_name, spec), plans, ids[:8, :256],
                    EngineOptions(device=device, batch_size=batch, error_tokens=args.error_tokens,
                                  sequential=sequential))
        layer.load_state_dict(saved)
    torch.cuda.synchronize(device)


def bench_7b_shape(args: argparse.Namespace) -> None:
    from perp.models.families import LLAMA
    from perp.prune import EngineOptions, create_method, plan_pruning, prune_model
    from perp.prune.patterns import PruneSpec

    if args.device == "auto":
        if not torch.cuda.is_available():
            emit({"model": args.model, "skipped": "no CUDA device (pass --device cpu to force; very slow)"})
            return
        device = torch.device("cuda")
    else:
        device = torch.device(args.device)
    dtype = torch.bfloat16
    nsamples = args.nsamples if args.nsamples_given else 128
    seqlen = args.seqlen if args.seqlen_given else 2048
    ids = torch.randint(0, 32000, (nsamples, seqlen), generator=torch.Generator().manual_seed(args.seed))
    batch = args.batch_size or max(1, 16384 // seqlen)

    model = build_7b_shape(args.layers, device, dtype, args.seed)
    dense_forward(model, ids[:batch], batch, device)  # warm-up
    floor = dense_forward(model, ids, batch, device)
    floor_decoder = dense_forward(model, ids, batch, device, decoder_only=True)
    state = {name: tensor.to("cpu", copy=True) for name, tensor in model.state_dict().items()}
    model.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    warm_up_methods(model, ids, args, device, batch)
    for job in args.jobs.split(","):
        method_name, pattern, granularity = parse_job(job)
        from perp.config import parse_pattern

        spec = PruneSpec(sparsity=args.sparsity, nm=parse_pattern(pattern), granularity=granularity or "row")
        model.load_state_dict(state)
        plans = plan_pruning(model, LLAMA, ["*"], [], spec)
        method = create_method(method_name, spec)
        options = EngineOptions(device=device, batch_size=batch, error_tokens=args.error_tokens,
                                sequential=args.sequential)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        result = prune_model(model, LLAMA, method, plans, ids, options)
        prune_s = time.perf_counter() - started
        emit({
            "model": args.model, "device": str(device), "method": method_name, "pattern": pattern,
            "sequential": result.sequential,
            "granularity": spec.granularity, "layers": args.layers, "tokens": ids.numel(),
            "prune_s": round(prune_s, 3), "dense_forward_s": round(floor, 3),
            "dense_decoder_forward_s": round(floor_decoder, 3), "prune_over_forward": round(prune_s / floor, 3),
            "tokens_per_s": round(ids.numel() / prune_s, 1),
            "peak_memory_bytes": result.peak_device_bytes or peak_rss(),
            "peak_memory_gib": round((result.peak_device_bytes or peak_rss()) / 2**30, 3),
            "achieved_sparsity": round(sum(e["pruned"] for e in result.linears.values())
                                       / sum(e["shape"][0] * e["shape"][1] for e in result.linears.values()), 6),
            "timings": {key: round(value, 3) for key, value in result.timings.items()},
        })
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (or any model spec), or llama2-7b-shape")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", default="wanda,sparsegpt", help="comma list of METHOD[:PATTERN[:GRANULARITY]]")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--calib", default=str(DEFAULT_CALIB))
    parser.add_argument("--nsamples", type=int, default=None)
    parser.add_argument("--seqlen", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="windows per micro-batch")
    parser.add_argument("--compute-dtype", default="auto", help="auto, float32, bfloat16 (calibration forwards)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--error-tokens", type=int, default=512)
    parser.add_argument("--owl-lambda", type=float, default=0.0, help="OWL per-layer sparsity (SmolLM2 jobs); 0: off")
    parser.add_argument("--owl-m", type=float, default=5.0)
    parser.add_argument("--sequential", default="layer", choices=["layer", "linear", "auto"],
                        help="engine mode: layer (reference, 2 passes) or linear (true-sequential, 1 pass)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of llama2-7b-shape")
    parser.add_argument("--solver", default="auto", choices=["auto", "loop", "solve"],
                        help="SparseGPT leaf solver (auto: solve on CUDA, loop on CPU)")
    parser.add_argument("--eval", default=None, help="WikiText-2 test text: report perplexity of each pruned model")
    parser.add_argument("--eval-dense", action="store_true", help="also evaluate the dense model")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--out", default=None, help="where pruned checkpoints go (default: a temp dir)")
    args = parser.parse_args()
    args.nsamples_given, args.seqlen_given = args.nsamples is not None, args.seqlen is not None
    args.nsamples = args.nsamples or 32
    args.seqlen = args.seqlen or 512
    if args.threads:
        torch.set_num_threads(args.threads)
    from perp.prune.methods.sparsegpt import SparseGPT

    SparseGPT.solver = args.solver
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.model == "llama2-7b-shape":
        bench_7b_shape(args)
    else:
        bench_smollm2(args)


if __name__ == "__main__":
    main()
