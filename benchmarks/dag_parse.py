"""Parse time of ctune's DAG files against a bare one-task DAG, measured three ways in one run.

1. As Airflow's dag-processor parses a file: a child forked from a parent that has Airflow loaded
   (``DagFileProcessorProcess``, the class the dag-processor uses), which imports the file, serialises its DAGs
   and sends them back; timed from the fork to the result in the parent. This is the parse work inside the
   duration Airflow records for each DAG (``DagModel.last_parse_duration``, on the DAG's page and in the REST
   API); Airflow's own figure adds a variable 0-1 s of the manager's loop (it collects a finished child on its
   next pass, polling once a second), which would drown the difference between files.
2. The file's own import: ``DagBag.process_file`` in a fresh process that has imported Airflow first (the
   duration ``airflow dags report`` prints): what ctune's imports and DAG construction add, with none of the
   parse's fixed costs around it.
3. ``python <dag file>`` as a whole, Airflow's import included: the check Airflow's best practices give.

Bytecode caching is on, as in any deployment (warm-up parses write the caches first), and the DAG files point at
a workspace holding the default ``params.yaml``, which they read for the training backend as they do when
deployed. Besides the bare DAG (one EmptyOperator), a DAG of the daily DAG's shape made of EmptyOperators (as
many chained tasks, the same Param and default_args) is timed the same way: what Airflow itself charges for
that shape, so ctune's own share shows. Target: each ctune DAG file at most 1.5x the bare DAG (median of
``--repeat`` runs; of three times as many for the dag-processor's parse, whose fork timing is the noisiest).
Prints one table per measure, writes JSON.

    .venv/bin/python benchmarks/dag_parse.py               # 7 repeats
    .venv/bin/python benchmarks/dag_parse.py --small       # 3 repeats, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DAG_FILES = ("ctune_daily.py", "ctune_incoming.py", "ctune_rollback.py")
TARGET_RATIO = 1.5
DEFAULT_REPEAT = 7
SMALL_REPEAT = 3

BARE_DAG = '''\
import datetime as dt

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG

with DAG("bare", schedule="@daily", start_date=dt.datetime(2026, 1, 1), catchup=False) as dag:
    EmptyOperator(task_id="only")
'''

# The same shape as ctune_daily with Airflow's own operators: as many chained tasks, the same date Param and the
# same default_args (filled in from ctune_ops.airflow.dags, so the reference follows the DAG). What Airflow itself
# charges for such a DAG, beside which ctune's share of a parse shows.
SAME_SHAPE_TEMPLATE = '''\
import datetime

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Param, chain

with DAG("same_shape", schedule="@daily", start_date=datetime.datetime(2026, 1, 1), catchup=True,
         max_active_runs=1, params={{"date": Param(None, **{schema!r})}}, default_args={default_args!r}) as dag:
    chain(*[EmptyOperator(task_id=f"task_{{i}}") for i in range({tasks})])
'''
SAME_SHAPE = "same shape, EmptyOperators"
SAME_SHAPE_FILES = ("ctune_daily.py", "ctune_incoming.py")  # the files of that shape (rollback has one task)


def same_shape_dag() -> str:
    """The same-shape DAG file's source, with ctune_daily's Param, default_args and task count."""
    from ctune_ops.airflow.dags import DAILY_TASKS, DATE_PARAM, _default_args

    return SAME_SHAPE_TEMPLATE.format(schema=DATE_PARAM.schema, default_args=_default_args(), tasks=len(DAILY_TASKS))


def parse_seconds(path: Path, env: dict[str, str]) -> float:
    """One fresh process: Airflow imported, then the file parsed; returns the parse's own wall time."""
    code = (
        "import json, sys, time\n"
        "import airflow.sdk\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "from airflow.providers.standard.operators.empty import EmptyOperator\n"
        "bag = DagBag(dag_folder=sys.argv[1], collect_dags=False)\n"
        "start = time.perf_counter()\n"
        "found = bag.process_file(sys.argv[1])\n"
        "elapsed = time.perf_counter() - start\n"
        "print(json.dumps({'s': elapsed, 'dags': sorted(d.dag_id for d in found),"
        " 'errors': {k: str(v) for k, v in bag.import_errors.items()}}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"parsing {path} failed:\n{result.stderr[-2000:]}")
    data = json.loads(result.stdout.strip().splitlines()[-1])
    if data["errors"] or not data["dags"]:
        raise RuntimeError(f"{path}: import errors {data['errors']} / no DAGs")
    return data["s"]


# Runs in a process of its own that imports Airflow, never ctune (a parent with ctune's modules loaded would hand
# them to every forked child and hide their import): parses each file through the dag-processor's own class,
# interleaved, and prints {file: [seconds, ...]}.
PROCESSOR_CODE = """\
import json, os, selectors, signal, sys, time, uuid
from pathlib import Path

import structlog
from airflow.dag_processing.processor import DagFileProcessorProcess

POLL_S = 0.0005  # the manager polls once a second; a short poll times the parse, not the wait
DEADLINE_S = 120  # a child that hangs is killed, as the manager's dag_file_processor_timeout would


def parse(path):
    selector = selectors.DefaultSelector()
    with open(os.devnull, "wb") as sink:
        proc = DagFileProcessorProcess.start(
            id=uuid.uuid4(), path=path, bundle_path=path.parent, bundle_name="dag_parse_benchmark",
            dag_file_rel_path=path.name, callbacks=[], selector=selector, logger=structlog.get_logger("dag_parse"),
            logger_filehandle=sink, subprocess_logs_to_stdout=False, client=None)
        while not proc.is_ready:
            if time.monotonic() - proc.start_time > DEADLINE_S:
                proc.kill(signal.SIGKILL)
                raise SystemExit(f"{path}: no result after {DEADLINE_S} s")
            for key, _ in selector.select(timeout=POLL_S):
                handler, on_close = key.data
                try:
                    more = handler(key.fileobj)
                except (BrokenPipeError, ConnectionResetError):
                    more = False
                if not more:
                    on_close(key.fileobj)
                    key.fileobj.close()
        elapsed = time.monotonic() - proc.start_time
    result = proc.parsing_result
    selector.close()
    if result is None or result.import_errors or not result.serialized_dags:
        raise SystemExit(f"{path}: no DAG parsed ({result and result.import_errors})")
    return elapsed


warmup, repeat = int(sys.argv[1]), int(sys.argv[2])
files = [Path(p) for p in sys.argv[3:]]
times = {str(p): [] for p in files}
for round_ in range(warmup + repeat):  # warm-up rounds first, not kept
    for path in files:
        seconds = parse(path)
        if round_ >= warmup:
            times[str(path)].append(seconds)
print(json.dumps(times))
"""
PROCESSOR_WARMUP = 2
PROCESSOR_REPEAT_FACTOR = 3  # these parses take ~70 ms, and fork timing is noisy: three times the repeats


def processor_seconds(paths: list[Path], repeat: int, env: dict[str, str]) -> dict[Path, list[float]]:
    """Each file parsed ``repeat`` times through Airflow's DagFileProcessorProcess (see PROCESSOR_CODE)."""
    result = subprocess.run([sys.executable, "-c", PROCESSOR_CODE, str(PROCESSOR_WARMUP), str(repeat),
                             *map(str, paths)], env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the dag-processor parses failed:\n{result.stderr[-2000:]}")
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return {path: data[str(path)] for path in paths}


def process_seconds(path: Path, env: dict[str, str]) -> float:
    """``python <dag file>`` as a whole (Airflow's own import included): the check Airflow's best practices give."""
    start = time.perf_counter()
    subprocess.run([sys.executable, str(path)], env=env, capture_output=True, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--small", action="store_true", help="fewer repeats (CI)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dag_parse.json")
    args = parser.parse_args(argv)
    repeat = args.repeat or (SMALL_REPEAT if args.small else DEFAULT_REPEAT)

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        bare = home / "bare_dag.py"
        bare.write_text(BARE_DAG, encoding="utf-8")
        same_shape = home / "same_shape_dag.py"
        same_shape.write_text(same_shape_dag(), encoding="utf-8")
        # the DAG files read the workspace's params.yaml (the training backend) as they do when deployed
        workspace = home / "workspace"
        workspace.mkdir()
        shutil.copy(REPO / "ctune_ops" / "resources" / "params.yaml", workspace / "params.yaml")
        env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__CORE__DAGS_FOLDER": str(home), "CTUNE_WORKSPACE": str(workspace)}
        # a deployment's modules have their bytecode cached (pip compiles it at install; Python writes it on first
        # import); without it every parse would time compiling ctune's sources
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        files = {"bare (1 EmptyOperator)": bare, SAME_SHAPE: same_shape,
                 **{name: REPO / "dags" / name for name in DAG_FILES}}
        for path in files.values():  # warm-up: writes the bytecode caches, not timed
            parse_seconds(path, env)
        times: dict[str, list[float]] = {name: [] for name in files}
        whole: dict[str, list[float]] = {name: [] for name in files}
        for _ in range(repeat):  # interleaved, so drifts in machine load hit every file alike
            for name, path in files.items():
                times[name].append(parse_seconds(path, env))
                whole[name].append(process_seconds(path, env))
        by_path = processor_seconds(list(files.values()), PROCESSOR_REPEAT_FACTOR * repeat, env)
        processor = {name: by_path[path] for name, path in files.items()}

    results = {}
    for measure, values, title in (
        ("dag_processor", processor, "as the dag-processor parses it: forked child, import, serialisation, result "
         "(the parse work inside DagModel.last_parse_duration)"),
        ("file_parse", times, "the file's own parse: DagBag.process_file in a fresh process with Airflow imported"),
        ("whole_process", whole, "`python <dag file>` as a whole, Airflow's import included"),
    ):
        medians = {name: statistics.median(v) for name, v in values.items()}
        base = medians["bare (1 EmptyOperator)"]
        rows = [{"file": name, "median_ms": round(m * 1000, 1), "min_ms": round(min(values[name]) * 1000, 1),
                 "ratio": round(m / base, 2)} for name, m in medians.items()]
        worst = max(row["ratio"] for row in rows if row["file"] in DAG_FILES)
        floor = medians[SAME_SHAPE] / base  # Airflow's own cost of a DAG of that shape
        own = {name: round((medians[name] - medians[SAME_SHAPE]) * 1000, 2) for name in SAME_SHAPE_FILES}
        print(f"\n{title} (median of {len(values[SAME_SHAPE])})")
        print(f"{'file':<26}{'median ms':>11}{'min ms':>9}{'ratio':>8}")
        for row in rows:
            print(f"{row['file']:<26}{row['median_ms']:>11}{row['min_ms']:>9}{row['ratio']:>8}")
        print(f"target: every ctune DAG file <= {TARGET_RATIO}x the bare DAG: "
              f"{'met' if worst <= TARGET_RATIO else 'NOT met'} (worst {worst}x)")
        print(f"Airflow's own DAG of the daily shape: {floor:.2f}x the bare DAG; ctune's files of that shape "
              f"beyond it (ms): {own}")
        results[measure] = {"rows": rows, "worst_ratio": worst, "met": worst <= TARGET_RATIO,
                            "same_shape_ratio": round(floor, 2), "ctune_ms_beyond_same_shape": own}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**results, "repeat": repeat, "target_ratio": TARGET_RATIO,
                                     "python": platform.python_version(), "cpus": os.cpu_count()}, indent=1) + "\n",
                         encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
