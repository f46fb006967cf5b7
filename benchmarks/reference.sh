#!/usr/bin/env bash
# The reference run in one command, within a wall-clock budget (default 540 s), on an offline GPU machine:
#
#   bash benchmarks/reference.sh OUT_DIR                       # teachers, MTARD student, the test-set table
#   bash benchmarks/reference.sh OUT2 --preset baseline_mt --epochs N   # extra args go to the example: here an
#                    # ablation student of the MTARD student's N epochs, from the teachers the first command cached
#   bash benchmarks/reference.sh OUT3 --epochs N --no-autoattack --option beta=2   # a lever, ~4.5 min on an H200
#   WALL=250 bash benchmarks/reference.sh OUT4 --preset baseline --student-seconds like:mtard --no-autoattack
#                    # the Baseline student in the seconds the MTARD student was allotted, stopped by 250 s
#
# A later command reuses the cached teachers only under the same BUDGET: they are named by their nominal share
# of it, so another BUDGET trains new ones (H200 run 3 in benchmarks/RESULTS.md). Keep BUDGET and pass --epochs.
#
# It installs the carried wheels if pydantic is missing (.gpu/wheels, see ../shared/GPU.md), decodes CIFAR-10
# into $DATA_DIR (default /tmp/cifar10) unless train.npz is there, runs examples/mtard_cifar.py --plan speedrun
# with the budget counted from this script's start, and writes at most 8 files into OUT_DIR: eval.json,
# reference.log, the student's metrics.jsonl and its figures (losses.png, weights.png, accuracy.png), and the
# metrics of the teachers it trained (cached ones are reused, not copied). Teachers are cached in RUN_DIR/teachers
# by recipe, seed and budget share; the student trains in a folder of RUN_DIR/run named by its configuration
# (--folder-by-config), so a command that trains the same student resumes it (or, finished, evaluates it again)
# and another (a lever, another budget) trains its own.
# Setup time counts against the budget. Environment: BUDGET, DATA_DIR, GRACE (45: with the default budget the
# example is stopped at 585 s, inside a 600-s device call with time to copy its files), PLAN (speedrun), RUN_DIR, and
# WALL: the most seconds the whole command may take (a device call's limit less ~10 s), for a lever's call that
# keeps BUDGET (its teachers' cache names) but has less time than that left: the example fits its student and its
# evaluation's rows to WALL - 5 (--wall; a student given --student-seconds that no longer fit says so at its start;
# teachers not cached are refused, not trained short under the budget's names), and is stopped 5 s before WALL in
# case it has not ended, so it keeps what it finished (eval.json with the rows done) instead of the caller's kill.
set -euo pipefail
OUT=${1:?usage: bash benchmarks/reference.sh OUT_DIR [extra arguments for examples/mtard_cifar.py]}
shift
start=$(date +%s.%N)
stamp=$(mktemp)  # files newer than this were written by this command
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
since() { python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$1"; }
if ! python3 -c "import pydantic" 2>/dev/null; then
  if ! ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    echo "pydantic is missing and there are no wheels in .gpu/wheels: see ../shared/GPU.md" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .gpu/site ]; then export PYTHONPATH=$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}; fi  # pyautoattack
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

wheels_s=$(since "$start")  # the pydantic probe, and the wheels' install where it fails
DATA_DIR=${DATA_DIR:-/tmp/cifar10}
if [ ! -f "$DATA_DIR/train.npz" ]; then
  prepare=.gpu/data/prepare.py
  [ -f "$prepare" ] || prepare=../shared/data/prepare.py
  python3 "$prepare" "$DATA_DIR" >/dev/null
fi
RUN_DIR=${RUN_DIR:-/tmp/multiteach_reference}
# the setup's parts, with the clock time the example's log lines compare with, in the log too
read -r setup_s data_s left < <(python3 -c "import sys, time; s = time.time() - float(sys.argv[1])
print(f'{s:.1f} {s - float(sys.argv[2]):.1f} {float(sys.argv[3]) - s:.1f}')" "$start" "$wheels_s" "${BUDGET:-540}")
echo "reference run: started $(date -d "@$start" +%T); setup ${setup_s} s (wheels ${wheels_s} s, data ${data_s} s);" \
     "${left} s of ${BUDGET:-540} s left" | tee "$OUT/reference.log"
set +e
# SIGTERM GRACE (45) s past the budget, or 5 s before WALL: a stage checkpoints, the evaluation keeps its finished
# rows in eval.json, the example ends in one line (timeout then exits 124); the same command resumes
stop=$(python3 -c "import sys, time; left, grace, wall, start = sys.argv[1:]
stop = float(left) + float(grace)
if wall: stop = min(stop, float(wall) - 5 - (time.time() - float(start)))
print(max(int(stop), 1))" "$left" "${GRACE:-45}" "${WALL:-}" "$start")
# the example aims to end by then (its own exit margin before it), not at WALL itself
wall=${WALL:+$(python3 -c "import sys; print(float(sys.argv[1]) - 5)" "$WALL")}
timeout --signal=TERM "$stop" \
  python3 examples/mtard_cifar.py --plan "${PLAN:-speedrun}" --budget "${BUDGET:-540}" --started-at "$start" \
    --data-dir "$DATA_DIR" ${wall:+--wall "$wall"} \
    --run-dir "$RUN_DIR/run" --teacher-cache "$RUN_DIR/teachers" --folder-by-config --autoattack --quiet "$@" 2>&1 \
  | tee -a "$OUT/reference.log"
rc=${PIPESTATUS[0]}
set -e
# this command's student: the run folder it wrote into (others there are earlier commands' students)
written() { find "$1" -mindepth 2 -maxdepth 2 -type f -newer "$stamp" -printf '%h\n' 2>/dev/null | sort -u || true; }
student=$(written "$RUN_DIR/run" | head -n 1)
if [ -n "$student" ]; then
  for f in eval.json metrics.jsonl losses.png weights.png accuracy.png; do
    [ -f "$student/$f" ] && cp "$student/$f" "$OUT/$f"
  done
fi
for entry in $(written "$RUN_DIR/teachers"); do  # the teachers this command trained (cached ones were not)
  [ -f "$entry/metrics.jsonl" ] && cp "$entry/metrics.jsonl" "$OUT/teacher_$(basename "$entry" | cut -d- -f1).jsonl"
done
echo "reference run: exit $rc, $(python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.0f}')" "$start") s in all"
rm -f "$stamp"
exit "$rc"
