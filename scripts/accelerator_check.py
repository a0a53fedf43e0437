"""Check rival-jax on this machine's accelerator and print one table: check, result, figure.

It runs the tests marked `accelerator` (tests/test_accelerator.py: cuDNN attention against the
blockwise kernel in bf16, bf16 against float32 end to end, generation sharded over all local devices
against one device, the programs' memory against the device's) and the benchmark's GPU
configuration (SD 1.5 architecture, random weights, 512x512, bfloat16, cuDNN attention, 5 steps,
4 variations). Exit code: 0 all passed, 1 a check failed, 2 no accelerator (nothing was checked).

    python scripts/accelerator_check.py                # on a GPU machine (a few minutes)
    python scripts/accelerator_check.py --allow-cpu    # smoke run of the same code on the CPU, tiny settings
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The benchmark's GPU configuration, and its CPU stand-in for `--allow-cpu`.
GPU_BENCHMARK = "--family sd1 --resolution 512 --dtype bfloat16 --attention cudnn --steps 5 --counts 4 --repeats 2"
CPU_BENCHMARK = "--model tiny --steps 2 --counts 2 --repeats 1"
CHECKS = {
    "test_cudnn_attention_is_as_accurate_as_the_blockwise_kernel_in_bfloat16": "cuDNN vs blockwise attention, bf16",
    "test_bfloat16_end_to_end_is_finite_and_close_to_float32": "bf16 end to end vs float32",
    "test_generation_sharded_over_all_local_devices_equals_one_device": "sharded generation = one device",
    "test_benchmark_memory_figures_fit_the_device": "program memory below device memory",
}
DEVICE_PROBE = (
    "import jax; from rival_jax.core.parallel import device_memory_bytes; d = jax.local_devices(); "
    "print(jax.default_backend(), len(d), device_memory_bytes() or 0, d[0].device_kind, sep='|')"
)


def run(command: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """A child process in the repository root (each one owns the accelerator while it runs)."""
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def probe_device(env: dict[str, str]) -> tuple[str, int, int, str]:
    """(backend, local device count, device memory bytes or 0, device kind), asked of a child process."""
    result = run([sys.executable, "-c", DEVICE_PROBE], env, 300)
    if result.returncode != 0:
        raise SystemExit(f"accelerator_check: error: JAX does not start: {result.stderr.strip().splitlines()[-1]}")
    backend, count, memory, kind = result.stdout.strip().splitlines()[-1].split("|", 3)
    return backend, int(count), int(memory), kind


def test_rows(env: dict[str, str], timeout: int) -> list[tuple[str, str, str]]:
    """Run `pytest -m accelerator` and read each test's result and figure from its JUnit report."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.xml"
        command = [sys.executable, "-m", "pytest", "-m", "accelerator", "tests/test_accelerator.py", "-q"]
        result = run([*command, "-p", "no:cacheprovider", f"--junitxml={report}"], env, timeout)
        if not report.exists():
            return [("accelerator tests", "ERROR", (result.stdout + result.stderr).strip().splitlines()[-1])]
        rows = []
        for case in ElementTree.parse(report).iter("testcase"):
            name, _, parameters = case.get("name", "").partition("[")
            check = CHECKS.get(name, name) + (f" [{parameters}" if parameters else "")
            figures = [p.get("value", "") for p in case.iter("property") if p.get("name") == "figure"]
            outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
            if outcome is None:
                rows.append((check, "pass", figures[0] if figures else ""))
            else:
                message = (outcome.get("message") or "").splitlines()[0][:100]
                rows.append((check, "skip" if outcome.tag == "skipped" else "FAIL", message))
        return rows


def benchmark_rows(arguments: str, memory: int, env: dict[str, str], timeout: int) -> list[tuple[str, str, str]]:
    """Run scripts/benchmark.py and pick its cost ratio and memory figures."""
    name = f"benchmark ({arguments})"
    result = run([sys.executable, "scripts/benchmark.py", *arguments.split()], env, timeout)
    output = result.stdout
    if result.returncode != 0:
        return [(name, "FAIL", (result.stderr.strip().splitlines() or ["no output"])[-1][:100])]
    ratio = re.findall(r"^N=(\d+): ratio ([\d.]+), like-for-like ([\d.]+)", output, re.MULTILINE)
    programs = re.search(r"^program memory .*:\n(.*)$", output, re.MULTILINE)
    generation = re.search(r"^\s*N \|\s*gen GiB \|\s*plain GiB\n((?:\s*\d+ \|.*\n?)+)", output, re.MULTILINE)
    peak = re.search(r"^peak device memory: (.*)$", output, re.MULTILINE)
    if not (ratio and programs and generation and peak):
        return [(name, "FAIL", "its output has no ratio or memory lines: see scripts/benchmark.py")]
    rows = [(name, "pass", "; ".join(f"N={n}: time ratio {r}, like-for-like {s}" for n, r, s in ratio))]
    generation_gib = [float(line.split("|")[1]) for line in generation.group(1).strip().splitlines()]
    largest = max(generation_gib)
    fits = not memory or largest * 2**30 < memory
    limit = f" of {memory / 2**30:.1f} GiB" if memory else ""
    figure = f"{programs.group(1)}; generation {largest:.2f} GiB{limit}; peak {peak.group(1)}"
    rows.append(("benchmark program memory", "pass" if fits else "FAIL", figure))
    return rows


def table(rows: list[tuple[str, str, str]]) -> str:
    """One text table, columns padded to their widest cell."""
    header = ("check", "result", "figure")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(2)]
    lines = [f"{row[0]:<{widths[0]}} | {row[1]:<{widths[1]}} | {row[2]}" for row in (header, *rows)]
    lines.insert(1, "-" * max(map(len, lines)))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allow-cpu", action="store_true", help="smoke run on the CPU (tiny settings, 2 devices)")
    parser.add_argument("--benchmark", help=f"benchmark.py arguments (default on a GPU: {GPU_BENCHMARK})")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed to each of the two runs")
    args = parser.parse_args()
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]  # this checkout's rival_jax, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if args.allow_cpu:
        env |= {"RIVAL_ACCELERATOR_ON_CPU": "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    backend, count, memory, kind = probe_device(env)
    if backend == "cpu" and not args.allow_cpu:
        print(
            "accelerator_check: no accelerator: JAX runs on the CPU here, so nothing was checked. On a GPU machine "
            "install jax with CUDA (pip install -U 'jax[cuda12]'); --allow-cpu runs a smoke test of the checks.",
            file=sys.stderr,
        )
        return 2
    arguments = args.benchmark or (CPU_BENCHMARK if backend == "cpu" else GPU_BENCHMARK)
    print(f"device: {count} x {kind} ({backend}); benchmark: {arguments}", flush=True)
    rows = test_rows(env, args.timeout) + benchmark_rows(arguments, memory, env, args.timeout)
    print(table(rows))
    return 1 if any(result in ("FAIL", "ERROR") for _, result, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
