"""One command for a GPU machine: install, CUDA tests, op benchmark, model benchmark, one JSON.

    python tools/gpu_check.py [--out DIR] [--bench-args "--m 1 16"] [--budget 540]
    python tools/gpu_check.py --dry-run --out /tmp/dry     # the same phases on the CPU, tiny shapes
    python tools/gpu_check.py --prepare                    # on the CPU machine: fill .gpu/ from PyPI

Phases, in this order:
  install      if onnxruntime has no CUDA provider: the wheels in --stage (default .gpu/) (whole `*.whl`, `py/*.whl`,
               and onnxruntime-gpu split into `ortgpu.part*`, joined here) installed with
               `pip install --no-deps --target` into a folder put first on PYTHONPATH
  models       tools/make_bench_models.py: the decoders the model benchmark compares, built in the
               background while pytest runs (its compression uses the GPU too, so the benchmarks
               wait for it: they time the GPU alone)
  pytest       tests/test_cuda.py
  bench_op     tools/bench_op.py --device cuda (plus --bench-args)
  bench_model  tools/bench_model.py --device cuda, one phase per model
Each phase is a process group with its own time limit, cut to what is left of --budget seconds,
and killed at it; a phase runs whether or not the ones before it passed. OUT/gpu_check.json holds
every phase's command, exit status, pass/fail, seconds and results (the JSON its tool writes, or
pytest's counts); OUT/gpu_check.log all their output, OUT/logs/ each phase's alone. OUT defaults to
$OUT. The models are built under --work, outside OUT (gigabytes); --reuse-models keeps a complete
earlier build there (a rerun on the same machine saves the build).

--dry-run runs every phase on CPUExecutionProvider at tiny sizes (tiny models, a few tokens, one
small bench_op shape on the CPU), with no GPU, to prove the script before a GPU machine's minutes
are spent on it (tests/test_gpu_check.py).

--prepare (on the development machine, before a GPU session) fills the stage folder from PyPI: the
onnxruntime-gpu wheel for the image's Python 3.12, split into parts that fit one transfer, and the
wheels the image lacks in py/, at the versions installed here (so the GPU run tests what was tested
here); it prints the device calls that carry them over.

Needs the slim_onnx library (built with nvcc for the CUDA phases), torch (with CUDA on the GPU
machine), onnx and numpy; onnx-ir, pytest and onnxruntime-gpu may come from --stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ORT_GPU = "onnxruntime-gpu==1.31.1"  # what --prepare stages, split into ortgpu.part*
RESERVE_S = 5  # kept back from the budget to write the results
# What the GPU image lacks (docs/environment: it has torch, numpy, onnx, triton, cupy), staged by --prepare
# at the versions installed here; wheels for its CPython 3.12 on x86-64 Linux.
STAGED_PACKAGES = ("onnx-ir", "onnxscript", "pytest", "iniconfig", "pluggy", "transformers", "optimum", "optimum-onnx",
                   "accelerate", "huggingface_hub", "hf-xet", "tokenizers", "safetensors", "regex", "PyYAML", "tqdm",
                   "requests", "urllib3", "idna", "certifi", "charset-normalizer", "typing-inspection")
STAGE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PART_BYTES = 60 << 20  # under the device's 64 MiB per transfer

# (GPU, dry run) arguments that differ
BENCH_OP = (["--device", "cuda"], ["--device", "cpu", "--k", "256", "--n", "256", "--m", "1", "4", "--seconds", "0.02"])
BENCH_MODEL = (["--device", "cuda", "--prefill", "512", "--decode", "128", "--batch", "1", "16", "--repeats", "2"],
               ["--dry-run", "--prefill", "16", "--decode", "4", "--batch", "1", "2", "--repeats", "1"])
MODELS = (["--device", "cuda", "--jobs", "6"], ["--device", "cpu", "--jobs", "2", "--tiny"])
# phase: seconds (GPU machine: expected about install 20, models 110 beside pytest 60, bench_op 100, bench_model 80 + 50)
LIMITS = {"install": 90, "models": 170, "pytest": 150, "bench_op": 150, "bench_model": 130}
VARIANT_LIMIT_S = 45  # each model variant's process within bench_model


@dataclasses.dataclass
class Phase:
    name: str
    command: list[str]
    limit: float
    results: Path | None = None  # the JSON (or pytest's junit XML) the command writes
    passing: tuple[int, ...] = (0,)  # exit statuses that pass
    process: subprocess.Popen | None = None
    start: float = 0.0


class Runner:
    """Runs the phases as process groups under one deadline, and keeps the record and the log."""

    def __init__(self, out: Path, env: dict, budget: float):
        self.out, self.env = out, env
        self.deadline = time.monotonic() + budget - RESERVE_S
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.log = open(out / "gpu_check.log", "w")  # noqa: SIM115 - closed in main
        self.record: dict[str, dict] = {}

    def say(self, message: str) -> None:
        print(message, flush=True)
        self.log.write(message + "\n")
        self.log.flush()

    def note(self, name: str, **fields) -> None:
        """A phase that ran in this process, or did not run."""
        self.record[name] = fields
        self.say(f"== {name}: {json.dumps(fields)}")

    def start(self, phase: Phase) -> Phase:
        phase.limit = min(phase.limit, self.deadline - time.monotonic())
        self.say(f"== {phase.name} (limit {phase.limit:.0f} s): {shlex.join(phase.command)}")
        if phase.limit < 10:
            return phase
        log = open(self.out / "logs" / f"{phase.name}.log", "w")  # noqa: SIM115 - the child holds it
        phase.process = subprocess.Popen(phase.command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # its own group: killed whole at the limit
        log.close()
        phase.start = time.monotonic()
        return phase

    def finish(self, phase: Phase) -> dict:
        """Wait for a started phase (to its limit), then record it and append its output to the log."""
        if phase.process is None:
            self.note(phase.name, passed=False, skipped="no time left in the budget")
            return self.record[phase.name]
        timed_out = False
        try:
            phase.process.wait(timeout=max(0.0, phase.start + phase.limit - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(phase.process)
        rc = phase.process.returncode
        seconds = round(time.monotonic() - phase.start, 1)
        text = (self.out / "logs" / f"{phase.name}.log").read_text(errors="replace")
        self.log.write(text)
        tail = "\n".join(text.splitlines()[-25:])
        print(tail, flush=True)
        self.record[phase.name] = {"command": shlex.join(phase.command), "rc": rc, "passed": rc in phase.passing and not timed_out,
                                   "timed_out": timed_out, "seconds": seconds, "limit_s": round(phase.limit),
                                   "log": f"logs/{phase.name}.log", "results": _results(phase.results)}
        self.say(f"== {phase.name}: {'passed' if self.record[phase.name]['passed'] else 'FAILED'} "
                 f"(rc {rc}{', timed out' if timed_out else ''}, {seconds} s)")
        return self.record[phase.name]

    def run(self, phase: Phase) -> dict:
        return self.finish(self.start(phase))


def _kill_group(process: subprocess.Popen) -> None:
    """SIGTERM to the phase's process group, SIGKILL to what is left after 3 s."""
    for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _results(path: Path | None):
    """What a phase's tool wrote: its JSON, or pytest's totals from the junit XML; None if nothing."""
    if path is None or not path.exists():
        return None
    try:
        if path.suffix == ".xml":
            suite = ET.parse(path).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                      if case.find("failure") is not None or case.find("error") is not None]
            return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")} | {"failed": failed}
        return json.loads(path.read_text())
    except (ET.ParseError, json.JSONDecodeError, AttributeError) as error:
        return {"unreadable": f"{path.name}: {error}"}


def ort_probe(env: dict) -> dict:
    """The onnxruntime that the phases import: version, providers, where it lives."""
    probe = ("import json, onnxruntime as o; print(json.dumps({'version': o.__version__, "
             "'providers': o.get_available_providers(), 'file': o.__file__}))")
    try:
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60,
                             check=False)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-2000:]}
    except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError) as error:
        return {"error": repr(error)}


def install_wheels(stage: Path, target: Path, timeout: float) -> list[str]:
    """pip-install the stage's wheels (the onnxruntime-gpu parts joined first) into `target`; their names."""
    wheels = sorted(stage.glob("*.whl")) + sorted((stage / "py").glob("*.whl"))
    parts = sorted(stage.glob("ortgpu.part*"))
    target.mkdir(parents=True, exist_ok=True)
    if parts:
        joined = target.parent / "ortgpu.whl"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as chunk:
                    shutil.copyfileobj(chunk, out)
        wheels.append(joined.replace(joined.with_name(wheel_file_name(joined))))
    if wheels:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--upgrade", "-q", "--target",
               str(target), *map(str, wheels)]
        subprocess.run(cmd, check=True, timeout=timeout, capture_output=True, text=True)
    return [w.name for w in wheels]


def wheel_file_name(wheel: Path) -> str:
    """The file name pip needs for a wheel, read from its own dist-info (the parts carry no name)."""
    with zipfile.ZipFile(wheel) as archive:
        info = next(n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/WHEEL"))
        tag = next(line.split(":", 1)[1].strip() for line in archive.read(info).decode().splitlines()
                   if line.startswith("Tag:"))
    return f"{info.split('.dist-info/')[0]}-{tag}.whl"


def split_parts(wheel: Path, folder: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """Cut `wheel` into folder/ortgpu.partNN (install_wheels joins them) and delete it; the parts."""
    parts = []
    with open(wheel, "rb") as whole:
        for index, chunk in enumerate(iter(lambda: whole.read(part_bytes), b"")):
            parts.append(folder / f"ortgpu.part{index:02d}")
            parts[-1].write_bytes(chunk)
    wheel.unlink()
    return parts


def prepare_stage(stage: Path) -> list[Path]:
    """Download what the GPU run installs into `stage` (replacing an earlier stage); the files to carry."""
    import importlib.metadata

    try:
        pins = [f"{name}=={importlib.metadata.version(name)}" for name in STAGED_PACKAGES]
    except importlib.metadata.PackageNotFoundError as missing:
        raise SystemExit(f"--prepare stages the versions installed here, and {missing} is not installed: "
                         "`pip install '.[test]'` first") from None
    foreign = [p.name for p in stage.glob("*") if not (p.name.startswith("ortgpu.part") or p.name == "py")]
    if foreign:
        raise SystemExit(f"--prepare replaces the stage folder {stage}, which holds other files too ({', '.join(foreign[:5])}): "
                         "give --stage an empty or earlier stage folder")
    download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                "3.12", "--implementation", "cp", *(f"--platform={p}" for p in STAGE_PLATFORMS)]
    scratch = stage.with_name(stage.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "py").mkdir(parents=True)
    subprocess.run([*download, "-d", str(scratch / "py"), *pins], check=True)
    subprocess.run([*download, "-d", str(scratch), ORT_GPU], check=True)
    split_parts(next(scratch.glob("*.whl")), scratch)
    shutil.rmtree(stage, ignore_errors=True)
    scratch.rename(stage)
    return sorted(stage.glob("ortgpu.part*")) + [stage / "py"]


def install(runner: Runner, args) -> None:
    """The install phase, in this process: nothing to do when onnxruntime already has CUDA."""
    start = time.monotonic()
    before = ort_probe(runner.env)
    if args.stage is None or "CUDAExecutionProvider" in before.get("providers", []):
        runner.note("install", passed=True, seconds=0.0, installed=[], onnxruntime=before)
        return
    try:
        installed = install_wheels(Path(args.stage), Path(args.target), LIMITS["install"])
        error = None
    except (OSError, subprocess.SubprocessError) as failure:
        installed, error = [], f"{failure}: {getattr(failure, 'stderr', '') or ''}"[-3000:]
    after = ort_probe(runner.env)
    runner.note("install", passed=error is None and "error" not in after, seconds=round(time.monotonic() - start, 1),
                installed=installed, onnxruntime=after, **({"error": error} if error else {}))


def model_phases(models: dict | None, args, dry: int) -> list[Phase]:
    """A bench_model phase per model whose dense export and SlimMatMul model were built (also by a
    build cut short: its JSON lists each model as it is finished)."""
    phases = []
    for name, built in ((models or {}).get("models") or {}).items():
        paths = {variant: r["path"] for variant, r in built.items() if "path" in r}
        if "dense" not in paths or "slim" not in paths:
            continue
        json_path = Path(args.out) / f"bench_model_{name}.json"
        command = [sys.executable, "tools/bench_model.py", *BENCH_MODEL[dry], "--dense", paths["dense"], "--slim",
                   paths["slim"], "--variant-timeout", str(VARIANT_LIMIT_S), "--json", str(json_path)]
        for variant, flag in (("nbits", "--nbits"), ("slim_adapters", "--slim-adapters")):
            if variant in paths:
                command += [flag, paths[variant]]
        phases.append(Phase(f"bench_model_{name}", command, LIMITS["bench_model"], json_path))
    return phases


def environment(env: dict) -> dict:
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        smi = f"unavailable: {error}"
    return {"python": sys.version.split()[0], "gpu": smi, "cpus": os.cpu_count(), "onnxruntime": ort_probe(env)}


def run_phases(runner: Runner, args) -> None:
    work, dry, python = Path(args.work), int(args.dry_run), sys.executable
    install(runner, args)
    runner.record["environment"] = environment(runner.env)
    runner.say(f"== environment: {json.dumps(runner.record['environment'])}")

    models_json = work / "models.json"
    models = None
    if not args.no_bench:
        earlier = _results(models_json) if args.reuse_models else None
        if earlier and earlier.get("complete") and not any(
                "error" in r for built in earlier["models"].values() for r in built.values()):
            runner.note("models", passed=True, reused=str(models_json))
        else:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            models = runner.start(Phase("models", [python, "tools/make_bench_models.py", str(work / "models"),
                                                   *MODELS[dry], "--json", str(models_json)],
                                        LIMITS["models"], models_json))
    junit = Path(args.out) / "pytest.xml"
    # exit status 5, no test ran, is what a machine without a GPU gives (the module skips): a pass only there
    runner.run(Phase("pytest", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
                                f"--junitxml={junit}"], LIMITS["pytest"], junit, (0, 5) if dry else (0,)))
    if args.no_bench:
        return
    if models is not None:
        runner.finish(models)  # before the benchmarks: its compression would share their GPU
    bench_json = Path(args.out) / "bench_op.json"
    runner.run(Phase("bench_op", [python, "tools/bench_op.py", *BENCH_OP[dry], "--json", str(bench_json),
                                  *shlex.split(args.bench_args)], LIMITS["bench_op"], bench_json))
    phases = model_phases(_results(models_json), args, dry)
    if not phases:
        runner.note("bench_model", passed=False, skipped="no model was built")
    for phase in phases:
        runner.run(phase)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for the JSON and logs (default $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="every phase on the CPU at tiny sizes")
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole run")
    parser.add_argument("--no-bench", action="store_true", help="only install and pytest")
    parser.add_argument("--bench-args", default="", help="extra arguments for tools/bench_op.py")
    parser.add_argument("--stage", help="folder with wheels to install if needed (default .gpu/; none with --dry-run)")
    parser.add_argument("--target", default="/tmp/slim_onnx_gpu_site")
    parser.add_argument("--work", default="/tmp/slim_onnx_gpu_work", help="folder for the models")
    parser.add_argument("--reuse-models", action="store_true", help="keep a complete earlier build in --work")
    parser.add_argument("--prepare", action="store_true", help="fill --stage from PyPI (development machine)")
    args = parser.parse_args()
    if args.prepare:
        stage = Path(args.stage or REPO / ".gpu").resolve()
        if not stage.is_relative_to(REPO) or stage == REPO:
            parser.error(f"--stage {stage}: the device carries only folders inside the repository {REPO}")
        *parts, last_part, py = (str(path.relative_to(REPO)) for path in prepare_stage(stage))
        folder = stage.relative_to(REPO)
        print(f"staged in {stage}. On the device, one call per part, back to back (the machine keeps /tmp while warm):")
        for part in parts:
            print(f"  carry [{part}]: mkdir -p /tmp/ortparts && cp {part} /tmp/ortparts/")
        print(f"  carry [{last_part}, {py}, slim_onnx/libslim_onnx_ops.so]: "
              f"cp -n /tmp/ortparts/* {folder}/; python tools/gpu_check.py --stage {folder} --out $OUT")
        return 0
    if not args.out:
        parser.error("give --out or set $OUT")
    if args.stage is None and not args.dry_run:
        args.stage = str(REPO / ".gpu")
    start = time.monotonic()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (args.target, str(REPO), env.get("PYTHONPATH")) if p)
    runner = Runner(Path(args.out), env, args.budget)
    try:
        run_phases(runner, args)
    finally:  # the record so far, whatever stopped the run
        phases = {name: r for name, r in runner.record.items() if name != "environment"}
        summary = {"dry_run": args.dry_run, "passed": all(r.get("passed") for r in phases.values()),
                   "seconds": round(time.monotonic() - start, 1), "budget_s": args.budget, **runner.record}
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(summary, indent=2))
        runner.say(f"== {'PASSED' if summary['passed'] else 'FAILED'} in {summary['seconds']} s: "
                   + ", ".join(f"{name} {'ok' if r.get('passed') else 'FAILED'}" for name, r in phases.items()))
        runner.log.close()
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
