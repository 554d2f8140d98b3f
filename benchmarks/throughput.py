"""Throughput of cache methods at their largest batch: a thin wrapper of ``shadowkv bench``.

    python benchmarks/throughput.py --arch llama-3.1-8b --contexts 32768,65536 \\
        --out bench_out/llama31
    python benchmarks/throughput.py --arch tiny --device cpu --contexts 512 --decode-steps 8 \\
        --sparse-budget 64 --outlier-chunks 4 --cache-memory-gb 0.05
"""

from __future__ import annotations

import sys

from shadowkv.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
