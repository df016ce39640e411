"""`make bench`: install what stlib is compared against, run the side-by-side benchmarks, write results.md.

Sections (each A/B pair alternates its order; tables give median and min–max):
  state     ST training throughput and peak RSS, stlib vs arc-state's `state tx train` (bench_state_compare.py)
  variants  stlib's fine-tuning variants: step time relative to full fine-tuning, peak RSS of LoRA vs full
  mhc       our mHC block vs lucidrains' hyper-connections mHC (bench_mhc.py --compare-lucidrains)
  startup   time to the first training step for both tools; `make demo` stage times when a demo log exists

arc-state and hyper-connections live in their own venv, benchmarks/.venv (requirements-bench.txt; torch is
installed first, pinned); a package already at its pinned version is not reinstalled. The full run writes
benchmarks/results.md; `--quick` / `--only` runs write benchmarks/.work/results_partial.md unless `--out` is given.

    python benchmarks/run.py [--quick] [--only state variants mhc startup] [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_state_compare as compare

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV = BENCH / ".venv"
REQUIREMENTS = BENCH / "requirements-bench.txt"
SECTIONS = ("state", "variants", "mhc", "startup")
PROFILE_BELOW = 1.5  # stlib / arc-state ratio under which the report includes a profile of one stlib step


# ------------------------------------------------------------------------------ benchmarks/.venv


def _pins() -> dict[str, str]:
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            if not version:
                raise ValueError(f"{REQUIREMENTS}: {line!r} must pin an exact version (name==version)")
            pins[name.strip()] = version.strip()
    return pins


def _installed(python: Path, names: list[str]) -> dict[str, str | None]:
    """Installed versions in the bench venv (local labels such as +cpu dropped); None = absent."""
    code = ("import importlib.metadata as m, json, sys\nout = {}\nfor n in sys.argv[1:]:\n"
            "    try: out[n] = m.version(n).split('+')[0]\n    except m.PackageNotFoundError: out[n] = None\n"
            "print(json.dumps(out))")
    import json

    return json.loads(subprocess.check_output([str(python), "-c", code, *names], text=True))


def _pip(python: Path, args: list[str]) -> None:
    command = [str(python), "-m", "pip", "install", *args]
    print("[bench] $ " + shlex.join(command), flush=True)
    subprocess.check_call(command)


def ensure_bench_venv(torch_spec: str) -> dict[str, str]:
    """Create benchmarks/.venv and install the pinned comparison packages, skipping what is already there."""
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"[bench] creating {VENV}", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    pins = _pins()
    have = _installed(python, list(pins))
    wrong = {n: have[n] for n, v in pins.items() if have[n] != v}
    if not wrong:
        print(f"[bench] {VENV.relative_to(REPO)}: " + ", ".join(f"{n}=={v}" for n, v in pins.items()) +
              " already installed, skipping install", flush=True)
        return pins
    print(f"[bench] {VENV.relative_to(REPO)}: need " + ", ".join(f"{n}=={pins[n]} (have {v})" for n, v in wrong.items()),
          flush=True)
    if have.get("torch") != pins.get("torch"):
        _pip(python, shlex.split(torch_spec))  # first and pinned: arc-state would otherwise pull a CUDA build
    _pip(python, ["-r", str(REQUIREMENTS)])
    still = {n: v for n, v in _installed(python, list(pins)).items() if v != pins[n]}
    if still:
        raise RuntimeError(f"after pip install, {VENV} still has {still}; expected {pins}")
    return pins


# ------------------------------------------------------------------------------ sections 3 and 4


def run_mhc(threads: int, repeats: int, device: str) -> tuple[str, list[str], str]:
    """bench_mhc.py in the bench venv (it has hyper-connections); its printed tables, verbatim."""
    command = [str(VENV / "bin" / "python"), "benchmarks/bench_mhc.py", "--compare-lucidrains", "--threads",
               str(threads), "--repeats", str(repeats), "--device", device]
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    print("[bench] $ PYTHONPATH=. " + shlex.join(command), flush=True)
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"bench_mhc.py failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    print(out.stdout, flush=True)
    summary = []
    # row: threads, name, wall median/min/max, x plain, cpu median, x plain, cpu p20, x plain
    rows = {name: [float(v) for v in values.split()] for name, values in re.findall(
        r"^\s*\d+ (mHC ours \(trained\)|mHC lucidrains|mHC ours \(init\)|mHC ours, torch ops \(trained\))"
        r"((?:\s+[\d.]+){8})\s*$", out.stdout, re.MULTILINE)}
    if "mHC lucidrains" in rows and "mHC ours (trained)" in rows:
        ours, theirs = rows["mHC ours (trained)"], rows["mHC lucidrains"]
        init = rows.get("mHC ours (init)")
        summary.append(
            f"mHC block (4 layers, hidden 128, seq 64, batch 8, fwd+bwd, {threads} thread(s)): ours {ours[0]:.0f} ms "
            f"(trained state) vs lucidrains hyper-connections {theirs[0]:.0f} ms — **{theirs[0] / ours[0]:.2f}× faster** "
            f"(goal ≥ 3×); ours × plain residual, CPU time: "
            + (f"{init[5]:.2f}× at init, " if init else "") + f"**{ours[5]:.2f}×** trained (goal ≤ 1.3×); "
            f"lucidrains {theirs[5]:.2f}×."
        )
        if "mHC ours, torch ops (trained)" in rows:
            summary.append(f"mHC CPU kernels (numba) vs the same maths in eager torch ops: trained state "
                           f"{ours[5]:.2f}× vs {rows['mHC ours, torch ops (trained)'][5]:.2f}× plain.")
    return "```\n" + out.stdout.strip() + "\n```", summary, "PYTHONPATH=. " + shlex.join(
        ["benchmarks/.venv/bin/python", *command[1:]])


_DEMO_DONE = "[stlib demo] done"


def demo_stage_times() -> tuple[str, list[str]]:
    """The stage-time table `stlib demo` prints at its end, from the newest log that has one (never runs it)."""
    candidates = [*REPO.glob("logs/*.log"), *REPO.glob("results/*.log"), *REPO.glob("results/**/demo*.log")]
    logs = sorted((p for p in set(candidates) if _DEMO_DONE in p.read_text(errors="replace")),
                  key=lambda p: p.stat().st_mtime)
    if not logs:
        return ("No demo log found (looked for a `logs/*.log` or `results/*.log` containing the demo's final stage "
                "table; e.g. `make demo 2>&1 | tee logs/demo.log`)."), []
    log = logs[-1]
    tail = log.read_text(errors="replace").split(_DEMO_DONE)[-1]
    stages = re.findall(r"^ {2}(\S.*?)\s+([\d.]+) s$", tail, re.MULTILINE)
    when = datetime.datetime.fromtimestamp(log.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    lines = [f"From `{log.relative_to(REPO)}` (written {when}):", "", "| stage | s |", "|---|---|"]
    lines += [f"| {name} | {float(seconds):.1f} |" for name, seconds in stages]
    total = [float(s) for n, s in stages if n == "total"]
    return "\n".join(lines), [f"`make demo` end to end: {total[0]:.0f} s ({log.relative_to(REPO)})."] if total else []


def profile_stlib_step(threads: int) -> str:
    """torch.profiler over 10 steps of the same model (bench_model.py --profile): where stlib's step time goes."""
    command = [sys.executable, "benchmarks/bench_model.py", "--threads", str(threads), "--steps", "10", "--repeats",
               "1", "--profile"]
    print("[bench] $ " + shlex.join(command), flush=True)
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False,
                         env=os.environ | {"OMP_NUM_THREADS": str(threads)})
    return "```\n$ " + shlex.join(["python", *command[1:]]) + "\n" + (out.stdout + out.stderr[-2000:]).strip() + "\n```"


# ------------------------------------------------------------------------------ report


def machine() -> list[str]:
    import torch

    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    memory = f"; memory {int(mem.group(1)) / 2**20:.0f} GiB" if mem else ""
    return [
        f"- nproc: {len(os.sched_getaffinity(0))}; CPU: {cpu.group(1) if cpu else platform.processor()}{memory}",
        (f"- Python {platform.python_version()}, torch {torch.__version__} (stlib venv); "
        f"CUDA available: {torch.cuda.is_available()}"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and runs: a smoke check (< 5 min)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda: passed to every tool (nothing needs a GPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads, the same for every tool")
    ap.add_argument("--torch", default="torch==2.13.0", help="pip spec for the bench venv's torch (installed first)")
    ap.add_argument("--work", type=Path, default=BENCH / ".work", help="generated data, runs and logs")
    ap.add_argument("--out", type=Path, default=None, help="report file (default: results.md for a full run)")
    args = ap.parse_args()
    full = not args.quick and set(args.only) == set(SECTIONS)
    out = args.out or (BENCH / "results.md" if full else args.work / "results_partial.md")
    command = shlex.join(["python", "benchmarks/run.py", *sys.argv[1:]])
    started, load0 = time.time(), os.getloadavg()

    pins = ensure_bench_venv(args.torch)
    s = compare.settings(args.work, args.threads, args.device, args.quick)
    needs_data = {"state", "variants", "startup"} & set(args.only)
    toml = compare.prepare_data(s.work) if needs_data else None
    sections: list[tuple[str, str]] = []
    summary: list[str] = []
    commands: list[str] = [command]
    pairs = None

    if "state" in args.only:
        text, lines, data = compare.compare_state(s, toml)
        pairs = data["pairs"]
        ratio = min(statistics.median(p["stlib"].cpu_steps_per_s / p["state"].cpu_steps_per_s for p in pairs),
                    statistics.median(p["stlib"].steps_per_s / p["state"].steps_per_s for p in pairs))
        if ratio < PROFILE_BELOW and not args.quick:
            text += f"\n\nstlib is below {PROFILE_BELOW}×: profile of its training step\n\n" + profile_stlib_step(
                args.threads)
        sections.append(("1. ST training throughput: stlib vs arc-state", text))
        summary += lines
        commands += [
            "arc-state: `state " + shlex.join(compare.state_args(toml, s.work / "runs", "state_0", s.steps)) + "`",
            f"stlib: `stlib train --config {s.work / 'stlib_bench.yaml'} " +
            shlex.join(compare.run_keys(s.work / "runs", "stlib_0", s.steps)) + "`",
            "(each through `python benchmarks/bench_state_compare.py --hook <tool> ...`, which adds the step timer)",
        ]
    if "variants" in args.only:
        text, lines, _ = compare.compare_variants(s, toml)
        sections.append(("2. Fine-tuning variants (stlib)", text))
        summary += lines
        commands.append("variants: `stlib train --config configs/variants/<variant>.yaml <data/training keys of "
                        "stlib_bench.yaml> model.init_from=<base>` (full list at the top of each log in "
                        f"{s.work.relative_to(REPO) if s.work.is_relative_to(REPO) else s.work}/logs/)")
    if "mhc" in args.only:
        text, lines, cmd = run_mhc(args.threads, 10 if args.quick else 30, args.device)
        sections.append(("3. mHC block: ours vs lucidrains hyper-connections", text))
        summary += lines
        commands.append(f"mHC: `{cmd}`")
    if "startup" in args.only:
        if pairs is None:  # one short pair just for start-up times
            quick = compare.Settings(s.work, s.threads, steps=12, warmup=2, runs=1, device=s.device,
                                     variant_steps=0, variant_runs=0)
            pairs = compare.compare_state(quick, toml)[2]["pairs"]
        text, lines = compare.startup_table(pairs)
        demo_text, demo_lines = demo_stage_times()
        sections.append(("4. Start-up and end to end", text + "\n\n" + demo_text))
        summary += lines + demo_lines

    load1 = os.getloadavg()
    report = [
        "# Benchmarks: stlib vs arc-state, variants, mHC",
        "",
        (f"Generated by `{command}` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} in "
        f"{(time.time() - started) / 60:.1f} min. Regenerate with `make bench`; see benchmarks/README.md."),
        "",
        "## Machine",
        *machine(),
        "- benchmarks/.venv: " + ", ".join(f"{n}=={v}" for n, v in pins.items()),
        (f"- torch/OpenMP threads: {args.threads} for every tool (OMP_NUM_THREADS, torch.set_num_threads); "
        f"device {args.device}"),
        (f"- 1/5/15-min load average at start {', '.join(f'{x:.1f}' for x in load0)}, at end "
        f"{', '.join(f'{x:.1f}' for x in load1)} (a shared machine: compare ratios within a pair, not absolute rates)"),
        "",
        "## Summary",
        *[f"- {line}" for line in summary],
        "",
    ]
    for title, text in sections:
        report += [f"## {title}", "", text, ""]
    report += ["## Commands", *[f"- {c.replace(str(REPO) + '/', '')}" for c in commands], ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report))
    print("\n".join(report[report.index("## Summary"):report.index("## Summary") + len(summary) + 1]))
    print(f"\n[bench] report written: {out}")


if __name__ == "__main__":
    main()
