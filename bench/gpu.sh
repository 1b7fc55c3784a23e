#!/usr/bin/env bash
# The GPU benchmark suite of the pruning and recovery issues, in one run: JSON files under $OUT.
#
#   bench/gpu.sh prune      8-layer LLaMA-2-7B-shape model, 128 x 2048 random tokens: Wanda, SparseGPT, 2:4;
#                           wall time against the dense bf16 forward, peak memory. The targets are for the
#                           default `layer` mode (micro-batched); `linear` mode, which sends the whole calibration
#                           set through a layer at once (~20 GiB of activations here), runs for comparison
#   bench/gpu.sh recover    the same model: tokens/s and peak memory of norm, masklora, scalelora vs full, 4 x 512
#   bench/gpu.sh quality    SmolLM2: Wanda 50% on C4 32 x 512, then masklora end to end, 200 steps of 4 x 512;
#                           WikiText-2 test perplexity (32 x 1024) dense, pruned, recovered
#   bench/gpu.sh all        the three, in that order
#
# It runs from the repository root, on a node with CUDA, torch and transformers. Without network access, build
# the offline kit first on a machine with PyPI (`bench/gpu_kit.sh`) and copy `.gpu/` next to this script's repo:
# its wheels are installed into a private directory, its data files and model are used instead of ../shared and
# the pip-installed SmolLM2. Settings (environment): OUT (only the JSON results go there), WORK (checkpoints and the
# perp cache, ~1 GB; default $TMPDIR/perp-gpu-work), KIT (.gpu), DEVICE (cuda), LAYERS (8), NSAMPLES (128),
# SEQLEN (2048), RECOVER_STEPS (200), RECOVER_LR (1e-3), SPEED_STEPS (3), SPEED_ROUNDS (1). Smaller values make a
# smoke run on CPU: DEVICE=cpu LAYERS=1 NSAMPLES=2 SEQLEN=128 RECOVER_STEPS=2 bench/gpu.sh all
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-bench-gpu-out}
WORK=${WORK:-${TMPDIR:-/tmp}/perp-gpu-work}
KIT=${KIT:-.gpu}
DEVICE=${DEVICE:-cuda}
LAYERS=${LAYERS:-8}
NSAMPLES=${NSAMPLES:-128}
SEQLEN=${SEQLEN:-2048}
RECOVER_STEPS=${RECOVER_STEPS:-200}
RECOVER_LR=${RECOVER_LR:-1e-3}
SPEED_STEPS=${SPEED_STEPS:-3}
SPEED_ROUNDS=${SPEED_ROUNDS:-1}  # a dedicated GPU: one round is steady enough
PYTHON=${PYTHON:-python3}
case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac
case $KIT in /*) ;; *) KIT=$PWD/$KIT ;; esac
case $WORK in /*) ;; *) WORK=$PWD/$WORK ;; esac
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PERP_CACHE=${PERP_CACHE:-$WORK/cache}  # not under $OUT: a small results folder is what comes back

if compgen -G "$KIT/whl/*.whl" > /dev/null; then
    site="$KIT/site"
    if [ ! -d "$site" ]; then  # installed once, into a temporary folder first: a failed install leaves none
        rm -rf "$site.tmp"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site.tmp" \
            "$KIT"/whl/*.whl && mv "$site.tmp" "$site" \
            || { echo "gpu.sh: installing the kit's wheels failed" >&2; exit 1; }
    fi
    export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PYTHON" -c "import perp.prune, perp.recover, perp.evaluate" \
    || { echo "gpu.sh: perp does not import here (a dependency missing from the node and the kit?)" >&2; exit 1; }

data_file() {  # the kit's copy, else the shared data beside the repository
    if [ -f "$KIT/data/$1" ]; then echo "$KIT/data/$1"; else echo "$PWD/../shared/data/$2/$1"; fi
}
C4=$(data_file c4_en_sample.jsonl c4)
WIKI=$(data_file wiki.test.raw wikitext2)

smollm2() {  # the kit's GGUF (joined from its parts once), else the pip-installed embedded model
    if compgen -G "$KIT/smollm2.gguf.part*" > /dev/null || [ -f "$KIT/smollm2.gguf" ]; then
        if [ ! -f "$KIT/smollm2.gguf" ]; then
            cat "$KIT"/smollm2.gguf.part* > "$KIT/smollm2.gguf.tmp" && mv "$KIT/smollm2.gguf.tmp" "$KIT/smollm2.gguf"
        fi
        if [ -f "$KIT/smollm2.gguf.sha256" ] && ! (cd "$KIT" && sha256sum -c --status smollm2.gguf.sha256); then
            echo "gpu.sh: $KIT/smollm2.gguf does not match its checksum (a part missing?)" >&2
            return 1
        fi
        echo "$KIT/smollm2.gguf"
    else
        echo "smollm2-135m"
    fi
}

run_prune() {
    local rc=0
    "$PYTHON" bench/prune.py --model llama2-7b-shape --device "$DEVICE" --layers "$LAYERS" --nsamples "$NSAMPLES" \
        --seqlen "$SEQLEN" --jobs wanda,sparsegpt,wanda:2:4,sparsegpt:2:4 | tee "$OUT/prune_7b_layer.jsonl" || rc=1
    "$PYTHON" bench/prune.py --model llama2-7b-shape --device "$DEVICE" --layers "$LAYERS" --nsamples "$NSAMPLES" \
        --seqlen "$SEQLEN" --jobs wanda,sparsegpt --sequential linear | tee "$OUT/prune_7b_linear.jsonl" || rc=1
    return $rc
}

run_recover() {
    local speed_batch=4 speed_seqlen=512
    if [ "$DEVICE" = cpu ]; then speed_batch=1; speed_seqlen=32; fi
    "$PYTHON" bench/recover.py speed --llama7b-shape --device "$DEVICE" --layers "$LAYERS" \
        --batch-size "$speed_batch" --seqlen "$speed_seqlen" --steps "$SPEED_STEPS" --rounds "$SPEED_ROUNDS" \
        --methods norm,masklora,scalelora | tee "$OUT/recover_speed_7b.json"
}

run_quality() {
    local model
    model=$(smollm2) || return 1
    "$PYTHON" bench/prune.py --model "$model" --device "$DEVICE" --calib "$C4" --nsamples 32 --seqlen 512 \
        --jobs wanda --eval "$WIKI" --eval-dense --out "$WORK/pruned" | tee "$OUT/quality_prune.jsonl" || return 1
    local dense_ppl
    dense_ppl=$("$PYTHON" -c 'import json,sys; print(next(json.loads(l)["ppl"] for l in open(sys.argv[1])
        if json.loads(l).get("job") == "dense"))' "$OUT/quality_prune.jsonl") || return 1
    "$PYTHON" bench/recover.py quality --start "$WORK/pruned/wanda" --dense "$model" --dense-ppl "$dense_ppl" \
        --method masklora --steps "$RECOVER_STEPS" --batch-size 4 --seqlen 512 --lr "$RECOVER_LR" \
        --data "$C4" --eval "$WIKI" --device "$DEVICE" --out "$WORK/recovered" | tee "$OUT/quality_recover.json"
}

status=0
case "${1:-all}" in
    prune) run_prune || status=1 ;;
    recover) run_recover || status=1 ;;
    quality) run_quality || status=1 ;;
    all) run_prune || status=1; run_recover || status=1; run_quality || status=1 ;;
    *) echo "usage: bench/gpu.sh [prune|recover|quality|all]" >&2; exit 2 ;;
esac
exit $status
