#!/usr/bin/env bash
# The GPU checks of issue 16 as ONE command, for a session lent a GPU (one H200: 15 min of device
# time, 10 min a command). Everything it measures lands under $OUT (at most 8 files come back):
#   summary.txt   versions, the data used, each step's exit code and seconds, the decode parity figures
#   bench.json    python benchmarks/bench.py at the cuda sizes: ResNet50 224 px batch 256 bf16,
#                 BERT-base length 128 batch 64, the image-folder decode case incl. data.decode_on=device
#   bench.log     its table and the issue-6 targets
#   parity.json   decode_on=device (nvjpeg) against the workers (PIL) on the shared JPEGs, per pixel
#   fit.log, predict.log, predict.jsonl
#                 a 1-GPU fit through the CLI (bf16-mixed, channels_last, torch.compile, JPEGs decoded
#                 on the device, 2 short epochs), then predict from its checkpoint alone
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine: OUT=... set by the device tool
#   PYTHON=/work/main/.venv/bin/python bash benchmarks/gpu_check.sh --dry-run  # CPU: quick sizes, no compile, fp32
#
# Each step has its own time limit (the sum, 470 s, leaves the 10-minute command room), and a failed
# step does not stop the others. Needs the shared JPEG folder: $TRANSFER_TEST_DATA, else shared/data
# inside the checkout (the device machine gets that folder only; copy /work/shared/data/cifar10 there,
# 2.5 MB of JPEGs plus the CIFAR batches, or just cifar10/imagefolder_jpg), else ../shared/data.
# Python packages the machine lacks (jsonargparse for the CLI) come from a carried .whl/ folder.
set -u -o pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$REPO/gpu-check-out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/transfer-gpu-check-XXXXXX)
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TORCH_HOME="$WORK/torch_home" HF_HOME="$WORK/hf_home" TRANSFER_CACHE_DIR="$WORK/cache"

DATA=""
for candidate in "${TRANSFER_TEST_DATA:-}" "$REPO/shared/data" "$REPO/../shared/data"; do
    if [ -n "$candidate" ] && [ -d "$candidate/cifar10/imagefolder_jpg/train" ]; then DATA=$(cd "$candidate" && pwd); break; fi
done
export TRANSFER_TEST_DATA="$DATA"
JPEGS="$DATA/cifar10/imagefolder_jpg"
SUMMARY="$OUT/summary.txt"
{
    date -u +"%F %T UTC"
    echo "mode: $([ $DRY = 1 ] && echo 'dry run (CPU, quick sizes)' || echo 'GPU')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" - <<'EOF' 2>&1
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "torchvision", "lightning", "transformers", "jsonargparse", "PIL"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:
        print(name, "MISSING:", err)
import torch
print("cuda available:", torch.cuda.is_available())
EOF
    if [ -n "$DATA" ]; then echo "JPEG folder: $JPEGS"; else echo "JPEG folder: NOT FOUND (set TRANSFER_TEST_DATA or copy shared/data into the checkout)"; fi
} >"$SUMMARY"

ONLY=${ONLY:-bench,parity,fit,predict}  # a rerun of some steps: ONLY=fit,predict
SLOWER=$([ $DRY = 1 ] && echo 3 || echo 1)  # two shared CPU cores: the limits only keep a dry run finite
step() {  # step NAME SECONDS COMMAND...: run it with a limit, its output in $OUT/NAME.log
    local name=$1 limit=$(($2 * SLOWER)) start=$SECONDS
    shift 2
    case ",$ONLY," in *",$name,"*) ;; *) return 0 ;; esac
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "step $name: exit $rc in $((SECONDS - start)) s (limit $limit s)$([ $rc = 124 ] && echo ', TIMED OUT')" | tee -a "$SUMMARY"
    return $rc
}

if [ $DRY = 1 ]; then
    DEVICE=cpu BENCH=(--device cpu --quick) TRAINER=(--trainer.accelerator=cpu --trainer.precision=32-true)
    COMPILE=false SIZE=32
else
    DEVICE=cuda BENCH=(--device cuda) TRAINER=(--trainer.accelerator=gpu --trainer.devices=1 --trainer.precision=bf16-mixed)
    COMPILE=true SIZE=224
fi

# 1. The benchmark at the device's sizes (sizes.py): transfer beside plain loops, same process setup.
step bench 240 "$PY" benchmarks/bench.py "${BENCH[@]}" --only resnet50_224,bert,decode --out "$OUT/bench.json"

# 2. Pixels of decode_on=device against the workers' PIL decoding, at the training size (224 px from
#    32 px JPEGs: upsampling spreads any decoder difference over many pixels), image by image.
step parity 40 "$PY" - "$JPEGS" "$DEVICE" "$SIZE" "$OUT/parity.json" <<'EOF'
import json, sys
import torch
from transfer_cli.backbones.base import ImagePreprocessing
from transfer_cli.data import ImageFolderDataModule

root, device, size, out = sys.argv[1], torch.device(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
prep = ImagePreprocessing(crop_size=size, resize_size=size * 8 // 7, mean=(0.5,) * 3, std=(0.25,) * 3)
sides = {}
for decode_on in ("workers", "device"):
    data = ImageFolderDataModule(root, batch_size=128, num_workers=2, decode_on=decode_on, decoded_cache_gb=0)
    data.use_preprocessing(prep)
    data.setup("fit")
    torch.manual_seed(0)  # the training split's shuffle: the same order on both sides
    batches = [data.transfer_batch_to_device(b, device, 0) for s in ("val", "train") for b in data.split_loader(s)]
    sides[decode_on] = (sum((b["ids"] for b in batches), []), torch.cat([b["inputs"].to(device) for b in batches]))
ids_w, px_w = sides["workers"]
ids_d, px_d = sides["device"]
assert ids_w == ids_d, "the two paths read different images or orders"
diff = (px_w.int() - px_d.int()).abs().float()
per_image = diff.flatten(1).mean(1)
result = {
    "images": len(ids_w), "size": size, "device": str(device),
    "max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
    "worst_image_mean_abs": per_image.max().item(),
    "share_over_2": (diff > 2).float().mean().item(),
    "worst_image_share_over_2": (diff > 2).flatten(1).float().mean(1).max().item(),
    "test_tolerance_holds": bool(per_image.max() <= 0.5 and (diff > 2).flatten(1).float().mean(1).max() <= 0.01),
}
json.dump(result, open(out, "w"), indent=2)
print(json.dumps(result))
EOF
[ -f "$OUT/parity.json" ] && echo "parity: $(cat "$OUT/parity.json" | tr -d '\n ')" >>"$SUMMARY"

# 3. A 1-GPU fit through the CLI: bf16-mixed, torch.compile, channels_last (always on for image
#    backbones and batches), JPEGs decoded on the device; then predict from the checkpoint alone.
step fit 150 "$PY" -m transfer_cli fit --config resnet50-cifar10 --config debug \
    --model.init_args.backbone.init_args.weights=null --model.init_args.backbone.init_args.image_size=$SIZE \
    --model.init_args.compile=$COMPILE \
    --data=transfer_cli.data.ImageFolderDataModule --data.init_args.root="$JPEGS" \
    --data.init_args.decode_on=device --data.init_args.batch_size=64 --data.init_args.num_workers=4 \
    "${TRAINER[@]}" --trainer.max_epochs=2 --trainer.limit_train_batches=4 --trainer.default_root_dir="$WORK/runs"
CKPT=$(find "$WORK/runs" -name last.ckpt 2>/dev/null | head -1)
[ -z "$CKPT" ] && CKPT=$(find "$WORK/runs" -name '*.ckpt' 2>/dev/null | head -1)
echo "checkpoint: ${CKPT:-none}" >>"$SUMMARY"
if [ -n "$CKPT" ]; then
    step predict 40 "$PY" -m transfer_cli predict --ckpt "$CKPT" --input "$JPEGS/test/cat" \
        --output "$OUT/predict.jsonl" "${TRAINER[@]}"
    echo "predict rows: $(wc -l <"$OUT/predict.jsonl" 2>/dev/null || echo 0)" >>"$SUMMARY"
fi
grep -h "first training step\|epoch . done" "$OUT/fit.log" >>"$SUMMARY" 2>/dev/null
rm -rf "$WORK"
cat "$SUMMARY"
