#!/usr/bin/env bash
# Build .gpukit/, what a lent GPU machine needs to run chatft's CUDA tests and GPU benchmarks offline.
#
#   bash bench/device/kit.sh          # on the dev machine, from anywhere; about 10 s once pip's cache is warm
#
# .gpukit/ (git-ignored, carried to the device with carry [".gpukit"]; bench/device/session.sh uses it there):
#   wheels/     the Python packages the GPU image lacks, for CPython 3.12 on manylinux x86-64: transformers and
#               peft at this venv's versions (the image's own are older: results should match this machine),
#               trl at the bench's pin, datasets, omegaconf, pydantic and whatever their Requires-Dist needs that
#               the image does not hold at a version that satisfies it (checked below; one version per package)
#   tokenizer/  the demo model's tokenizer and chat template, no weights (gpu-* workloads: --model .gpukit/tokenizer)
#   data/       the ../shared/data file the bench reads (Alpaca) and its SOURCE.md
#   bench-data/ the gpu-* workloads' synthetic rows for session.sh's default steps and peers (run.py --prepare-data)
#   MANIFEST.txt  what is inside, with versions and sha256s
# Fails when the kit exceeds 56 MiB or the kit plus the working tree that travels exceeds the device's 64 MiB.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
KIT=$ROOT/.gpukit
KIT_LIMIT_MIB=56
TRAVEL_LIMIT_MIB=64

die() { echo "kit.sh: error: $*" >&2; exit 1; }
[ -x "$PY" ] || die "no Python at $PY (run 'make install' first, or set PYTHON=)"
git check-ignore -q .gpukit/ || die ".gpukit/ is not git-ignored: add '/.gpukit/' to .gitignore"

# The bench pins TRL in pyproject.toml ([project.optional-dependencies] bench = ["trl==X"]).
TRL_VERSION=$(sed -n 's/^bench = \["trl==\([^"]*\)"\]/\1/p' pyproject.toml)
[ -n "$TRL_VERSION" ] || die "could not read the bench's TRL pin from pyproject.toml"

# What the GPU image lacks or holds too old for chatft and the bench; each at this venv's version.
# typing-extensions: pydantic 2.14 needs >= 4.16; fsspec: datasets caps it (<= 2026.9.0). The image holds both
# at versions nobody has read, so they travel too.
# pyarrow never travels, though datasets 5.2 asks for >= 24 and the image's version is unread: datasets and TRL
# were checked to build and train the bench's rows with pyarrow 21 and 23 (TRL's floor is 21), while a pyarrow
# installed into --target /tmp/site (outside sys.prefix) makes dill pickle the module itself and breaks
# datasets' fingerprinting (`Can't pickle <class 'MonthDayNano'>`) at any version.
CARRY=(transformers peft trl datasets dill multiprocess omegaconf pydantic pydantic-core annotated-types
       typing-inspection typing-extensions fsspec)

venv_version() {
    "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null
}

fetch() {  # NAME==VERSION ...: wheels for CPython 3.12 on manylinux x86-64, no dependencies
    local log
    log=$(mktemp)
    if ! "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$KIT/wheels" "$@" >"$log" 2>&1; then
        grep -v 'is ignored: it is neither a file nor a directory' "$log" >&2 || true
        rm -f "$log"
        die "pip download failed for: $*"
    fi
    rm -f "$log"
}

rm -rf "$KIT/wheels" "$KIT/tokenizer" "$KIT/data" "$KIT/MANIFEST.txt"
mkdir -p "$KIT/wheels" "$KIT/tokenizer" "$KIT/data"

# ------------------------------------------------------------------ wheels
specs=()
for name in "${CARRY[@]}"; do
    if [ "$name" = trl ]; then
        version=$TRL_VERSION
        venv_trl=$(venv_version trl || true)
        [ "$venv_trl" = "$TRL_VERSION" ] || echo "kit.sh: warning: this venv has trl ${venv_trl:-none}, the bench pins $TRL_VERSION"
    else
        version=$(venv_version "$name") || die "$name is not installed in $PY's environment"
    fi
    specs+=("$name==$version")
done
echo "wheels: ${specs[*]}"
fetch "${specs[@]}"

# Every Requires-Dist of every wheel must be met on the GPU machine: by a wheel of the kit, or by a package of the
# image (at its known version where one is known). Whatever is missing is fetched at this venv's version and the
# check runs again.
for round in 1 2 3 4 5; do
    missing=$("$PY" - "$KIT/wheels" <<'PYEOF'
import importlib.metadata as md
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

# The image's packages (device KINDS.md, read 2026-11-17), with the versions a session saw there where known.
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp"""
KNOWN = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
         "tokenizers": "0.23.2", "torch": "2.11.0", "transformers": "5.17.0", "triton": "3.6.0",
         "sentencepiece": "0.2.2", "onnx": "1.23.1"}
# The image holds transformers 5.17.0, whose own requirements (same bounds as the kit's transformers) are met there.
MET_BY_IMAGE_TRANSFORMERS = {"regex", "tqdm", "packaging", "pyyaml", "typer"}
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "os_name": "posix", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "platform_python_implementation": "CPython",
       "implementation_name": "cpython", "implementation_version": "3.12.3", "platform_release": "",
       "platform_version": "", "extra": ""}

image = {canonicalize_name(n) for n in IMAGE.split()}
wheels, problems, missing, unverified = {}, [], {}, []
for path in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, version, _, tags = parse_wheel_filename(path.name)
    if name in wheels:
        problems.append(f"two versions of {name}: {wheels[name][0]} and {version}")
    if not any(t.interpreter in ("py3", "cp312", "py312") and t.abi in ("none", "cp312", "abi3") for t in tags):
        problems.append(f"{path.name} is not for CPython 3.12")
    with zipfile.ZipFile(path) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        wheels[name] = (version, archive.read(meta).decode())
for name, (version, meta) in wheels.items():
    lines = meta.split("\n\n", 1)[0].splitlines()
    python = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("Requires-Python:")), "")
    if python and not SpecifierSet(python).contains("3.12.3"):
        problems.append(f"{name} {version} needs Python {python}")
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(ENV):
            continue
        dep = canonicalize_name(req.name)
        where = f"{name} {version} needs {req.name}{req.specifier}"
        if dep in wheels:
            if not req.specifier.contains(wheels[dep][0], prereleases=True):
                problems.append(f"{where}, the kit has {wheels[dep][0]}")
        elif dep in KNOWN:
            if not req.specifier.contains(KNOWN[dep], prereleases=True):
                missing[dep] = f"{where}; the image has {KNOWN[dep]}"
        elif dep in image:
            if str(req.specifier) and dep not in MET_BY_IMAGE_TRANSFORMERS:
                unverified.append(f"{where} (the image's version is unknown)")
        else:
            missing[dep] = f"{where}; the image lacks it"
for line in sorted(set(unverified)):
    print(f"unverified: {line}", file=sys.stderr)
for problem in problems:
    print(f"ERROR {problem}")
for dep, why in sorted(missing.items()):
    try:
        print(f"ADD {dep}=={md.version(dep)}  # {why}")
    except md.PackageNotFoundError:
        print(f"ERROR {why}, and this venv has no {dep} to take the version from")
PYEOF
)
    if grep -q '^ERROR' <<<"$missing"; then
        grep '^ERROR' <<<"$missing" >&2
        die "the wheels do not form a consistent set for the GPU machine"
    fi
    adds=$(sed -n 's/^ADD \([^ ]*\).*/\1/p' <<<"$missing")
    [ -z "$adds" ] && break
    grep '^ADD' <<<"$missing"
    # shellcheck disable=SC2086
    fetch $adds
    [ "$round" -lt 5 ] || die "dependencies still missing after 5 rounds"
done

# ------------------------------------------------------------------ tokenizer (no weights)
DEMO=$("$PY" scripts/get_demo_model.py --print-path)
[ -f "$DEMO/tokenizer.json" ] || die "no demo model tokenizer at $DEMO (run 'make demo-model' first)"
for f in "$DEMO"/*; do
    case "$(basename "$f")" in
        *.safetensors|*.bin|*.pt|*.pth|*.gguf|*.lock) ;;
        *) [ -f "$f" ] && cp "$f" "$KIT/tokenizer/" ;;
    esac
done
"$PY" - "$DEMO" "$KIT/tokenizer" <<'PYEOF'
import sys

from transformers import AutoTokenizer

demo, kit = (AutoTokenizer.from_pretrained(p) for p in sys.argv[1:3])
chat = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
same = len(demo) == len(kit) and demo.apply_chat_template(chat) == kit.apply_chat_template(chat)
assert same, "the kit's tokenizer does not reproduce the demo model's"
print(f"tokenizer: {len(kit)} tokens, chat template reproduced ({sys.argv[1]})")
PYEOF

# ------------------------------------------------------------------ the gpu-* workloads' synthetic rows
# Made here for session.sh's default steps and peers (bench/device/defaults.sh): about 40 s of tokenizing that the
# lease would otherwise pay. The cache key covers the tokenizer, the shapes and the code that makes the rows.
# shellcheck source=bench/device/defaults.sh
source "$ROOT/bench/device/defaults.sh"
rm -rf "$KIT/bench-data"
CHATFT_BENCH_DATA=$KIT/bench-data "$PY" bench/run.py --workload gpu-small-full --prepare-data \
    --steps "$SMALL_STEPS" --peers "$SMALL_PEERS" --model "$KIT/tokenizer" | tail -n 1
CHATFT_BENCH_DATA=$KIT/bench-data "$PY" bench/run.py --workload gpu-8b-lora --prepare-data \
    --steps "$B8_STEPS" --peers "$B8_PEERS" --model "$KIT/tokenizer" | tail -n 1
for workload in gpu-8b-lora gpu-small-full; do  # the profile step's shorter runs
    CHATFT_BENCH_DATA=$KIT/bench-data "$PY" bench/run.py --workload "$workload" --prepare-data \
        --steps "$PROFILE_STEPS" --peers "$PROFILE_PEERS" --model "$KIT/tokenizer" | tail -n 1
done

# ------------------------------------------------------------------ data (what bench/data.py reads)
SHARED=$("$PY" -c 'import sys; sys.path.insert(0, "."); from bench.data import shared_data_dir; print(shared_data_dir())')
for f in alpaca_en_demo.json SOURCE.md; do
    [ -f "$SHARED/$f" ] || die "missing $SHARED/$f"
    cp "$SHARED/$f" "$KIT/data/"
done
chmod -R u+w "$KIT/data"
echo "data: $(ls "$KIT/data" | tr '\n' ' ')(from $SHARED)"

# ------------------------------------------------------------------ manifest and sizes
{
    echo "# .gpukit built by bench/device/kit.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ) at $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "# tokenizer from $DEMO; data from $SHARED"
    (cd "$KIT" && find wheels tokenizer data bench-data -type f | sort | xargs sha256sum)
} >"$KIT/MANIFEST.txt"

"$PY" - "$KIT" "$KIT_LIMIT_MIB" "$TRAVEL_LIMIT_MIB" <<'PYEOF'
import subprocess
import sys
from pathlib import Path

kit, kit_limit, travel_limit = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
mib = 1024 * 1024
parts = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in sorted(kit.iterdir()) if p.is_dir()}
kit_size = sum(f.stat().st_size for f in kit.rglob("*") if f.is_file())
# What else travels: tracked files and untracked files git does not ignore.
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True,
                        check=True).stdout.decode().split("\0")
tree = sum(Path(p).stat().st_size for p in set(listed) if p and Path(p).is_file())
print("sizes: " + ", ".join(f"{name} {size / mib:.1f} MiB" for name, size in parts.items()))
print(f"kit: {kit_size / mib:.1f} MiB (limit {kit_limit:.0f}); with the working tree ({tree / mib:.1f} MiB): "
      f"{(kit_size + tree) / mib:.1f} MiB of the device's {travel_limit:.0f}")
if kit_size > kit_limit * mib:
    sys.exit(f"kit.sh: error: .gpukit is {kit_size / mib:.1f} MiB, over {kit_limit:.0f} MiB")
if kit_size + tree > travel_limit * mib:
    sys.exit(f"kit.sh: error: .gpukit plus the working tree is {(kit_size + tree) / mib:.1f} MiB, over {travel_limit:.0f}")
PYEOF
echo "ready: one device call, 'bash bench/device/session.sh' with carry [\".gpukit\"] and timeout_s 600 (bench/README.md)"
