# Sourced by the GPU scripts: the wheels the device image lacks, installed into /tmp/site, which lasts
# while the machine stays warm. `.whl` carries diffusers, peft, torchao, importlib_metadata; `.fa4a` and
# `.fa4b` carry FlashAttention-4 (flash-attn-4 4.0.0b36 and its CuTe DSL wheels), its 92 MB
# nvidia-cutlass-dsl-libs-cu13 wheel split in two (`split -b 50M`) because one call carries 64 MiB:
# part aa in one call, the rest in the next, while the machine is still warm. pip refuses to install
# nvidia-cutlass-dsl-libs-core beside the other wheels of its shared folder, so it is unzipped (with
# Python's zipfile: the image has no unzip).
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
export CALL_START=${CALL_START:-$(date +%s)}  # common.sh's BUDGET counts from here, installs included
if [ -d .whl ] && [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
mkdir -p /tmp/fa4
for part in .fa4a .fa4b; do [ -d "$part" ] && cp "$part"/* /tmp/fa4/; done
fa4_imports() { python3 -c "from flash_attn.cute.interface import _flash_attn_fwd" 2>/dev/null; }
if ! fa4_imports && [ -e /tmp/fa4/cu13.part-aa ] && [ -e /tmp/fa4/cu13.part-ab ]; then
  cat /tmp/fa4/cu13.part-* > /tmp/fa4/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    $(ls /tmp/fa4/*.whl | grep -v libs_core)
  python3 -m zipfile -e /tmp/fa4/nvidia_cutlass_dsl_libs_core-*.whl /tmp/site
fi
fa4_imports && echo "flash-attn-4: installed" || echo "flash-attn-4: absent (SDPA for padded batches)"
