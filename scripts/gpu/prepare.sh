#!/usr/bin/env bash
# Builds what scripts/gpu/run_on_device.sh needs into .gpu/ (ignored by git, carried to
# the GPU machine): the release binary, two PyTorch checkpoints with PyTorch's logits
# from the test fixtures (run ./scripts/test.sh once first) and the commit id.
set -euo pipefail
cd "$(dirname "$0")/../.."
ex="$(git rev-parse --git-dir)/info/exclude"; mkdir -p "$(dirname "$ex")"
grep -qx '/.gpu/' "$ex" 2>/dev/null || echo '/.gpu/' >> "$ex"
cargo build --release
rm -rf .gpu && mkdir -p .gpu
cp target/release/dynsparse .gpu/
for a in mobilenet_v2 efficientnet_lite0; do
  mkdir -p .gpu/$a
  cp target/fixtures/$a/checkpoint.pth target/fixtures/$a/input_b3.npy target/fixtures/$a/logits_b3.npy .gpu/$a/
done
git rev-parse HEAD > .gpu/COMMIT
git diff --quiet || echo "(uncommitted changes)" >> .gpu/COMMIT
du -sh .gpu
