"""CPU benchmarks of the TVM backend (see ``attncc.bench``): the same as ``attncc bench``.

    python benchmarks/cpu/bench_cpu.py --quick
    python benchmarks/cpu/bench_cpu.py --plot cpu.png --output benchmarks/results/cpu_<date>.md
"""

from attncc.bench import bench

if __name__ == "__main__":
    bench()
