#!/usr/bin/env bash
# Side-by-side latency of the web app: one server per model set, all started first, then the load runs interleaved
# (round 1: A B C, round 2: A B C, ...) so that every configuration sees the same machine load.
#
#   bash bench/app_latency.sh OUT_DIR NAME=CKPT[@SCORES] [NAME=CKPT[@SCORES] ...]
#   bash bench/app_latency.sh /tmp/lat \
#       lite0=logs/cpu_lite0_all/runs/<run>@logs/eval/runs/<eval>/scores.json \
#       'ensemble=[logs/cpu_lite0_all/runs/<run>,logs/baseline_cpu/runs/<run>]@logs/eval/runs/<eval>/scores.json'
#
# Env: ROUNDS (default 2) sequential rounds of N_SEQ (30) uploads; then runs of N_LOAD (200) uploads at each of
# CONCURRENCY ("4 200") in flight per server; IMAGES (default ../shared/data/ham10000_200x150/images); EXTRA (server
# overrides for all) and EXTRA_<name> (for one, e.g. EXTRA_nocam=gradcam=false); LESIONNET_<name> runs that server
# with another command (e.g. a wrapper that serves an older checkout, for a before/after comparison).
# Writes OUT_DIR/<name>_{startup.txt,seq<r>.json,load_c<c>.json,server.log} and prints each summary.
set -euo pipefail
out=$1; shift
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}; lesionnet=${LESIONNET:-.venv/bin/lesionnet}
images=${IMAGES:-../shared/data/ham10000_200x150/images}
rounds=${ROUNDS:-2}; n_seq=${N_SEQ:-30}; n_load=${N_LOAD:-200}; conc=${CONCURRENCY:-4 200}
port=8100; names=(); declare -A pid_of
trap 'kill "${pid_of[@]}" 2>/dev/null || true' EXIT

for spec in "$@"; do
  name=${spec%%=*}; rest=${spec#*=}; ckpt=${rest%%@*}; scores=""
  [[ $rest == *@* ]] && scores="scores=${rest#*@}"
  port=$((port + 1)); names+=("$name:$port")
  start=$(date +%s.%N)
  # shellcheck disable=SC2086
  extra_name="EXTRA_$name"; command_name="LESIONNET_$name"
  ${!command_name:-$lesionnet} serve "ckpt=$ckpt" $scores port=$port ${EXTRA:-} ${!extra_name:-} > "$out/${name}_server.log" 2>&1 &
  pid_of[$name]=$!
  until curl -sf "http://127.0.0.1:$port/healthz" > /dev/null; do
    kill -0 "${pid_of[$name]}" 2>/dev/null || { tail -20 "$out/${name}_server.log"; exit 1; }
    sleep 0.2
  done
  echo "$name: ready in $(echo "$(date +%s.%N) - $start" | bc) s, RSS $(ps -o rss= -p "${pid_of[$name]}") kB" \
    | tee "$out/${name}_startup.txt"
done

for r in $(seq 1 "$rounds"); do
  for entry in "${names[@]}"; do
    name=${entry%%:*}; p=${entry#*:}
    echo "== $name, round $r: $n_seq sequential uploads (load $(cut -d' ' -f1-3 /proc/loadavg))"
    $py bench/load_app.py --url "http://127.0.0.1:$p" -n "$n_seq" -c 1 --images "$images" --json "$out/${name}_seq$r.json"
  done
done
for c in $conc; do
  for entry in "${names[@]}"; do
    name=${entry%%:*}; p=${entry#*:}
    echo "== $name: $n_load uploads, $c in flight (load $(cut -d' ' -f1-3 /proc/loadavg))"
    $py bench/load_app.py --url "http://127.0.0.1:$p" -n "$n_load" -c "$c" --images "$images" \
      --json "$out/${name}_load_c$c.json"
  done
done
for entry in "${names[@]}"; do
  name=${entry%%:*}
  echo "$name: RSS after the runs $(ps -o rss= -p "${pid_of[$name]}") kB" | tee -a "$out/${name}_startup.txt"
done
