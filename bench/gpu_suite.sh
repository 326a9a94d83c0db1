#!/usr/bin/env bash
# The GPU half of issue 17 in one run, under 8 minutes on one H100 (each piece has its own time limit): results,
# tables and torch.profiler traces under $OUT.
#
#     DINO_SRC=... bash bench/gpu_env.sh     # here, once: bench/.official-dino and bench/.gpu-wheels (git-ignored)
#     bash bench/gpu_suite.sh                # on the GPU machine: carry bench/.official-dino and bench/.gpu-wheels
#     bash bench/gpu_suite.sh --smoke        # CPU: every piece for one tiny step, torch.compile aside (slow test in
#                                            # tests/test_device_decode.py)
#
# What it measures (docs/benchmarks.md, "GPU figures still missing"):
#   1. step, crops already on the device (bench/dino_step.py), ViT-S/16 and ViT-B/16 at 2 x 256x128 + 8 x 128x64,
#      batch 64: ours (default bf16; DINOv2; torch.compile at ViT-S) and the official DINO step side by side,
#      images/s, ms/step, peak memory, MFU; profiler traces of our ViT-S/16 step at batch 64 and 256.
#   2. end to end (bench/augment.py --gpu), same models and crops, 4 and 8 DataLoader workers: the official
#      pipeline, ours with crops.decode=cpu (colour on the CPU, and with gpu_augment) and with crops.decode=gpu;
#      images/s of the loader alone and of training fed by it; a profiler trace of decode=gpu training.
# Every piece runs even if one before it failed; the exit status is that of the first failure.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=${OUT:-bench/out-gpu}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ "$SMOKE" = 1 ] && PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if ls bench/.gpu-wheels/*.whl >/dev/null 2>&1 && [ "$SMOKE" = 0 ]; then  # what the GPU image lacks (gpu_env.sh)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        bench/.gpu-wheels/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
OFFICIAL=()
if [ -f bench/.official-dino/main_dino.py ]; then
    OFFICIAL=(--official bench/.official-dino)
else
    echo "# bench/.official-dino missing (bench/gpu_env.sh): the official DINO is not measured" |
        tee -a "$OUT/summary.txt"
fi
if [ "$SMOKE" = 1 ]; then  # tiny model and crops, one step, 1 worker: proves each piece runs, measures nothing
    STEP_S=(--tiny --device cpu --batch 4 --steps 1 --repeats 1 --profile-batches 4 --variants default,DINOv2)
    STEP_B=(--tiny --device cpu --batch 4 --steps 1 --repeats 1)
    E2E_S=(--tiny --device cpu --batch 4 --steps 1 --warmup 1 --workers 1 --images-e2e 8)
    E2E_B=()
    LIMIT=1800  # a loaded 2-core VM took 715 s for the step piece; an idle one far less
else
    STEP_S=(--arch vit_small --steps 20 --repeats 2 --profile-batches 64,256 --variants default,DINOv2,torch.compile)
    STEP_B=(--arch vit_base --steps 10 --repeats 2)
    E2E_S=(--arch vit_small --steps 20 --warmup 5 --workers 4 8)
    E2E_B=(--arch vit_base --steps 10 --warmup 3 --workers 4 8)
    LIMIT=150
fi
status=0
piece() {  # piece NAME SECONDS COMMAND...: run with a time limit, output in $OUT/NAME.txt, summary in summary.txt
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$WORK/$name.txt" 2>&1
    local rc=$?
    echo "## $name: exit $rc after $((SECONDS - t0)) s: $*" | tee -a "$OUT/summary.txt"
    grep -E '^(#|\|)' "$WORK/$name.txt" >>"$OUT/summary.txt"
    tail -n 5 "$WORK/$name.txt" | sed 's/^/    /' >>"$OUT/summary.txt"
    [ $rc = 0 ] || [ $status != 0 ] || status=$rc
}
"$PY" -c "import torch, torchvision; print('# torch', torch.__version__, 'torchvision', torchvision.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')" | tee -a "$OUT/summary.txt"
piece step_vit_small "$LIMIT" "$PY" bench/dino_step.py "${STEP_S[@]}" "${OFFICIAL[@]}" --profile "$WORK/traces" \
    --json "$WORK/step_vit_small.json"
[ "$SMOKE" = 1 ] || piece step_vit_base 90 "$PY" bench/dino_step.py "${STEP_B[@]}" --variants default,DINOv2 \
    "${OFFICIAL[@]}" --json "$WORK/step_vit_base.json"
piece e2e_vit_small "$LIMIT" "$PY" bench/augment.py --gpu "${E2E_S[@]}" "${OFFICIAL[@]}" --profile "$WORK/traces" \
    --json "$WORK/e2e_vit_small.json"
[ "$SMOKE" = 1 ] || piece e2e_vit_base 130 "$PY" bench/augment.py --gpu "${E2E_B[@]}" "${OFFICIAL[@]}" \
    --json "$WORK/e2e_vit_base.json"
# what comes back: summary.txt, the full outputs, and the traces (at most 8 files of 16 MiB from the device tool)
tar -C "$WORK" -czf "$OUT/outputs.tar.gz" --exclude traces .
tar -C "$WORK" -cf "$OUT/traces.tar" traces 2>/dev/null
rm -rf "$WORK"
echo "# gpu_suite: exit $status; $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
