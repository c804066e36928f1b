#!/bin/bash
# Text-to-image in fp8 (torchao, compiled) against the diffusers recipe: the default fp8, then with
# --fp8-every-linear. Each compiles cold in about 160 s on an H200: run it again on the same warm machine for
# what did not fit (the compile cache is read back).
source "$(dirname "$0")/env.sh"
bench throughput --only "${ONLY:-fp8,fp8-every-linear}"
