#!/usr/bin/env bash
# Wall time and peak RSS of real programs with glibc's malloc, libanyalloc.so
# and (when installed) jemalloc and mimalloc, all preloaded the same way.
# Rounds are interleaved (allocator order rotates each round), so that
# machine noise hits every allocator alike; the table shows the median and
# the best wall time and the median peak RSS, the date, the commit and the
# machine.
#
#   crates/anyalloc-c/bench.sh [ROUNDS] [--update-readme]     (default 5)
#
# --update-readme replaces the table in crates/anyalloc-c/README.md (between
# the "bench.sh table" markers) with this run's.
#
# Workloads: python3 running its own regression tests (two sets of modules:
# containers, io, gc; signals, threads, subprocess), python3 with threads
# and a subprocess, sort on 600k lines (plain, and with a small buffer and
# 2 threads), sqlite3 building and querying 150k rows.
#
# Environment: ANYALLOC_LIB=/path/to/libanyalloc.so to skip the build;
# CARGO_TARGET_DIR is honoured. Peer libraries are looked up in the usual
# Debian/Ubuntu places (apt-get install libjemalloc2 libmimalloc2.0).
set -euo pipefail

rounds=${1:-5}
# The commit measured (taken now: the tree may move while the rounds run).
commit="$(git -C "$(dirname "$0")" rev-parse --short HEAD 2>/dev/null || echo unknown)"
git -C "$(dirname "$0")" diff --quiet HEAD -- . ../anyalloc 2>/dev/null || commit="$commit (with local changes)"
update_readme=0
[[ ${2:-} == --update-readme ]] && update_readme=1
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

if [[ -z ${ANYALLOC_LIB:-} ]]; then
    (cd "$root" && cargo build --release -p anyalloc-c >&2)
    ANYALLOC_LIB=${CARGO_TARGET_DIR:-$root/target}/release/libanyalloc.so
fi
[[ -f $ANYALLOC_LIB ]] || { echo "no $ANYALLOC_LIB" >&2; exit 1; }
command -v /usr/bin/time >/dev/null || { echo "needs /usr/bin/time (apt-get install time)" >&2; exit 1; }

names=(glibc anyalloc)
libs=("" "$ANYALLOC_LIB")
for cand in jemalloc:/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \
            mimalloc:/usr/lib/x86_64-linux-gnu/libmimalloc.so.2 \
            jemalloc:/usr/lib/aarch64-linux-gnu/libjemalloc.so.2 \
            mimalloc:/usr/lib/aarch64-linux-gnu/libmimalloc.so.2; do
    if [[ -f ${cand#*:} ]]; then
        names+=("${cand%%:*}")
        libs+=("${cand#*:}")
    fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The sort input: 600k deterministic lines of words and numbers (~15 MB).
awk 'BEGIN { s = 12345; for (i = 0; i < 600000; i++) {
        w = ""; n = 4 + (s % 12);
        for (k = 0; k < n; k++) { s = (s * 1103515245 + 12345) % 2147483648; w = w sprintf("%c", 97 + s % 26) }
        s = (s * 1103515245 + 12345) % 2147483648;
        print w, s, s % 1000 } }' > "$work/lines.txt"

python=$(python3 -c 'import sys; print(sys.executable)' 2>/dev/null || true)
workloads=()
cmds=()
if [[ -n $python ]]; then
    # Python's own regression tests, sequential, in a scratch directory.
    if "$python" -c 'import test.test_dict, test.test_signal' 2>/dev/null; then
        workloads+=("python3 -m test dict set gc weakref io mmap"
                    "python3 -m test signal threading subprocess")
        cmds+=("env -C $work $python -m test test_dict test_set test_gc test_weakref test_io test_mmap"
               "env -C $work $python -m test test_signal test_threading test_subprocess")
    else
        echo "note: no Python test suite installed; skipping the python3 -m test workloads" >&2
    fi
    workloads+=("python3 threads+subprocess")
    cmds+=("$python $here/tests/workloads/threads_subprocess.py")
fi
workloads+=("sort 600k lines" "sort -k2n -S4M --parallel=2")
cmds+=("env LC_ALL=C sort $work/lines.txt"
       "env LC_ALL=C TMPDIR=$work sort -k2,2n -k1,1 -S 4M --parallel=2 $work/lines.txt")
if command -v sqlite3 >/dev/null; then
    workloads+=("sqlite3 150k rows")
    cmds+=("sqlite3 :memory: -init $here/tests/workloads/sqlite.sql")
fi

# results/<workload index>.<allocator index>: one "seconds kib" line per round
mkdir -p "$work/results"
for ((r = 0; r < rounds; r++)); do
    for ((w = 0; w < ${#workloads[@]}; w++)); do
        for ((k = 0; k < ${#names[@]}; k++)); do
            a=$(( (k + r) % ${#names[@]} ))
            pre=()
            [[ -n ${libs[a]} ]] && pre=(env "LD_PRELOAD=${libs[a]}")
            # shellcheck disable=SC2086
            # python3 -m test exits 2 when a test fails on this machine (it
            # does under glibc too): only a crash or a signal is a failure.
            status=0
            /usr/bin/time -f "%e %M" -o "$work/t" "${pre[@]}" ${cmds[w]} \
                < /dev/null > "$work/out" 2> "$work/err" || status=$?
            if [[ $status -ne 0 && ! ( $status -eq 2 && ${cmds[w]} == *" -m test "* ) ]]; then
                echo "FAILED: ${workloads[w]} with ${names[a]}: $(head -c 300 "$work/err")" >&2
                continue
            fi
            tail -n 1 "$work/t" >> "$work/results/$w.$a"
        done
    done
    echo "round $((r + 1))/$rounds done" >&2
done

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

table() {
    echo "| workload | allocator | median wall s | best wall s | vs glibc (median) | median peak RSS MiB |"
    echo "|---|---|---:|---:|---:|---:|"
    for ((w = 0; w < ${#workloads[@]}; w++)); do
        base=""
        [[ -s $work/results/$w.0 ]] && base=$(cut -d' ' -f1 "$work/results/$w.0" | median)
        for ((a = 0; a < ${#names[@]}; a++)); do
            f=$work/results/$w.$a
            [[ -s $f ]] || { echo "| ${workloads[w]} | ${names[a]} | failed | | | |"; continue; }
            med=$(cut -d' ' -f1 "$f" | median)
            best=$(cut -d' ' -f1 "$f" | sort -g | head -n 1)
            rss=$(cut -d' ' -f2 "$f" | median)
            ratio="-"
            [[ -n $base ]] && ratio=$(printf '%.2fx' "$(echo "$med / $base" | bc -l)")
            printf '| %s | %s | %.2f | %.2f | %s | %.1f |\n' "${workloads[w]}" "${names[a]}" \
                "$med" "$best" "$ratio" "$(echo "$rss / 1024" | bc -l)"
        done
    done
    echo
    echo "\`crates/anyalloc-c/bench.sh $rounds\` on $(date -u +%Y-%m-%d), commit $commit:" \
        "$rounds rounds, interleaved; $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end;" \
        "$(ldd --version | head -n 1)."
}

echo
table | tee "$work/table.md"
if ((update_readme)); then
    readme=$here/README.md
    grep -q '^<!-- bench.sh table begin -->$' "$readme" || { echo "no table markers in $readme" >&2; exit 1; }
    awk -v table="$work/table.md" '
        /^<!-- bench.sh table begin -->$/ { print; while ((getline l < table) > 0) print l; skip = 1; next }
        /^<!-- bench.sh table end -->$/ { skip = 0 }
        !skip { print }' "$readme" > "$work/readme" && cat "$work/readme" > "$readme"
    echo "updated $readme" >&2
fi
