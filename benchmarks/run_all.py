"""Runs every benchmark and writes results.json, RESULTS.md and plots/.

`python benchmarks/run_all.py [--quick] [--out benchmarks] [--only NAME,...]`

- `results.json`: the machine description and every benchmark's raw numbers;
- `RESULTS.md`: the machine, the command, and each benchmark's tables;
- `plots/*.png`: the plots the tables refer to.

Benchmarks run one after another in this process, timing benchmarks first.
A benchmark whose data is missing records why and the others still run.
`--quick` runs fewer configurations and repeats (and no MobileNetV2 or
ResNet50 inference); its numbers are marked as quick-run numbers.
`--only` reruns the named benchmarks and keeps the others' results from
`OUT/results.json`; each section names the command that produced it.
"""

import argparse
import gc
import json
import os
import sys
import time

import accuracy
import activation_ops
import applications
import calibration_time
import clip_norm
import common
import conversion_time
import data_free
import demo_accuracy
import inference_cost
import keras
import refinement
import refinement_memory
import refinement_time
import sizes
import synthetic_calibration
import weight_error

BENCHMARKS = {
    "activation_ops": activation_ops,
    "inference_cost": inference_cost,
    "conversion_time": conversion_time,
    "accuracy": accuracy,
    "demo_accuracy": demo_accuracy,
    "sizes": sizes,
    "weight_error": weight_error,
}
# Benchmarks too long for every run: each writes benchmarks/<name>.json when run
# alone (`python benchmarks/<name>.py --json benchmarks/<name>.json`), and
# RESULTS.md shows its section from that file, followed by benchmarks/notes/<name>.md
# (what the run showed, in words) when there is one.
STANDALONE = {
    "data_free": data_free,
    "clip_norm": clip_norm,
    "synthetic_calibration": synthetic_calibration,
    "refinement_time": refinement_time,
    "refinement": refinement,
    "refinement_memory": refinement_memory,
    "applications": applications,
    "calibration_time": calibration_time,
}


def _machine_markdown(machine):
    rows = [
        ["CPU", machine["cpu"]],
        ["cores", f"{machine['cores']} ({machine['cores_usable']} usable by this process)"],
        ["memory", f"{machine['memory_gib']} GiB"],
        ["OS", machine["os"]],
        ["Python / TensorFlow / Keras", f"{machine['python']} / {machine['tensorflow']} / {machine['keras']}"],
        ["numpy / scipy", f"{machine['numpy']} / {machine['scipy']}"],
        ["keras-powerquant", f"{machine['keras_powerquant']}, commit {machine['git_commit']}"],
        ["date", machine["date"]],
        ["load average at start (1/5/15 min)", " / ".join(str(v) for v in machine["load_average_at_start"])],
    ]
    return common.markdown_table(["", ""], rows)


def _results_markdown(results):
    quick = results["quick"]
    lines = ["# keras-powerquant benchmarks", ""]
    if quick:
        lines += [
            "**Quick run (`--quick`)**: fewer configurations and repeats than the full run; "
            "treat these numbers as a smoke test, not as results.",
            "",
        ]
    lines += [
        "Reproduce (from the repository root, with the shared data folder in `../shared/data` "
        "or `KPQ_SHARED_DATA` set):",
        "",
        "```",
        results["command"],
        "```",
        "",
        "Every number below comes from that run; raw numbers are in `results.json`. "
        "Timings are wall-clock on a shared machine: compare rows of the same table, "
        "taken interleaved in one process, rather than absolute values.",
        "",
        "## Machine",
        "",
        _machine_markdown(results["machine"]),
        "",
    ]
    for name, module in BENCHMARKS.items():
        result = results["benchmarks"].get(name)
        if result is None:
            continue
        command = result.get("command", results["command"])
        run = result.get("run", results["machine"])
        lines += [
            module.markdown(result),
            "",
            f"_{name}: {result['wall_seconds']:.0f} s, `{command}`, commit {run['git_commit']}, {run['date']}, "
            f"load average at start {' / '.join(str(v) for v in run['load_average_at_start'])}._",
            "",
        ]
        for path in results["plots"][name]:
            lines += [f"![{name}]({path})", ""]
    here = os.path.dirname(os.path.abspath(__file__))
    for name, module in STANDALONE.items():
        path = os.path.join(here, f"{name}.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                lines += [module.markdown(json.load(file)), "",
                          f"_{name}: from `python benchmarks/{name}.py --json benchmarks/{name}.json`, "
                          "run on its own._", ""]
            notes = os.path.join(here, "notes", f"{name}.md")
            if os.path.isfile(notes):
                with open(notes, encoding="utf-8") as file:
                    lines += [file.read().rstrip(), ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description="Run every keras-powerquant benchmark.")
    parser.add_argument("--quick", action="store_true", help="fewer configurations and repeats (minutes)")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                        help="folder for results.json, RESULTS.md and plots/ (default: benchmarks/)")
    parser.add_argument("--only", help="comma-separated benchmarks to rerun; the others' results are kept "
                        f"from OUT/results.json ({', '.join(BENCHMARKS)})")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    plots = os.path.join(out, "plots")
    os.makedirs(plots, exist_ok=True)
    command = " ".join(["python", "benchmarks/run_all.py", *sys.argv[1:]])
    selected = list(BENCHMARKS)
    results = {"command": command, "quick": args.quick, "benchmarks": {}, "plots": {}}
    if args.only:
        selected = [name.strip() for name in args.only.split(",")]
        unknown = sorted(set(selected) - set(BENCHMARKS))
        if unknown:
            parser.error(f"unknown benchmarks {unknown}; choose among {list(BENCHMARKS)}")
        with open(os.path.join(out, "results.json"), encoding="utf-8") as file:
            results = json.load(file)
    machine = common.machine_description()
    if not args.only:
        results["machine"] = machine
    if not common.shared_data_dir().is_dir():
        print(f"shared data folder {common.shared_data_dir()} not found (set KPQ_SHARED_DATA): "
              "the benchmarks on the MLPerf Tiny models are skipped", file=sys.stderr)
    started = time.perf_counter()
    for name in selected:
        module = BENCHMARKS[name]
        print(f"[{time.perf_counter() - started:6.0f} s] {name}...", flush=True)
        mark = time.perf_counter()
        result = module.run(quick=args.quick)
        result["wall_seconds"] = time.perf_counter() - mark
        result["command"] = command
        result["run"] = {key: machine[key] for key in ("git_commit", "date", "load_average_at_start")}
        results["benchmarks"][name] = result
        results["plots"][name] = [os.path.relpath(path, out) for path in module.plot(result, plots)]
        keras.backend.clear_session()
        gc.collect()
    if not args.only:
        results["total_seconds"] = time.perf_counter() - started
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as file:
        json.dump(results, file, indent=1)
    with open(os.path.join(out, "RESULTS.md"), "w", encoding="utf-8") as file:
        file.write(_results_markdown(results))
        file.write(f"_Total: {results['total_seconds'] / 60:.1f} min._\n")
    print(f"[{time.perf_counter() - started:6.0f} s] wrote {out}/results.json, RESULTS.md and plots/", file=sys.stderr)


if __name__ == "__main__":
    main()
