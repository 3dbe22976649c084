#!/usr/bin/env bash
# The Dockerfile's steps without Docker (`npm run docker:smoke`; CI runs it):
#   build stage:   clean dir with only what the build stage COPYs -> npm ci -> npm run build -> npm prune --omit=dev
#   runtime stage: clean dir with only what the final stage COPYs --from=build, the final stage's ENV only,
#                  CMD `node dist/src/server.js`, then /healthz and the image's own HEALTHCHECK command.
# It proves the image's file list and environment are enough to run keyward, and that no dev
# dependency is shipped. Everything happens in a temp dir that is removed on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKERFILE="$ROOT/Dockerfile"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/keyward-docker-smoke.XXXXXX")"
BUILD="$WORK/build"
APP="$WORK/app"
LOG="$WORK/server.log"
SERVER_PID=""

say() { printf 'docker-smoke: %s\n' "$*"; }
fail() {
  printf 'docker-smoke: FAIL: %s\n' "$*" >&2
  if [[ -s "$LOG" ]]; then
    printf -- '--- server output ---\n' >&2
    cat "$LOG" >&2
  fi
  exit 1
}

cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in node npm curl openssl; do
  command -v "$tool" >/dev/null || fail "$tool is required"
done
[[ -f "$DOCKERFILE" ]] || fail "no Dockerfile at $DOCKERFILE"

# --- build stage -------------------------------------------------------------------------------------
# The same files the build stage COPYs (package*.json, tsconfigs, src, db, openapi, public), nothing else.
say "build stage in $BUILD"
mkdir -p "$BUILD"
for item in package.json package-lock.json tsconfig.json tsconfig.build.json src db openapi public; do
  [[ -e "$ROOT/$item" ]] || fail "$item is missing from the repository"
  cp -R "$ROOT/$item" "$BUILD/$item"
done
(
  cd "$BUILD"
  npm ci --no-audit --no-fund
  npm run build
  npm prune --omit=dev --no-audit --no-fund
)
[[ -f "$BUILD/dist/src/server.js" ]] || fail "the build did not produce dist/src/server.js"

# --- runtime stage -----------------------------------------------------------------------------------
# Only what the final stage copies from the build stage.
say "runtime stage in $APP"
mkdir -p "$APP"
for item in package.json node_modules dist openapi public; do
  cp -R "$BUILD/$item" "$APP/$item"
done

# No dev dependency may reach the runtime image.
mapfile -t DEV_DEPS < <(node -e 'for (const n of Object.keys(require(process.argv[1]).devDependencies ?? {})) console.log(n)' "$APP/package.json")
[[ ${#DEV_DEPS[@]} -gt 0 ]] || fail "package.json lists no devDependencies; this check would prove nothing"
for dep in "${DEV_DEPS[@]}" jest typescript ts-jest; do
  [[ ! -e "$APP/node_modules/$dep" ]] || fail "dev dependency $dep is in the runtime node_modules"
done
[[ ! -e "$APP/node_modules/.bin/tsc" ]] || fail "tsc is in the runtime node_modules/.bin"
say "no dev dependencies in the runtime node_modules (checked ${#DEV_DEPS[@]} + jest, typescript, ts-jest)"

# The final stage's ENV lines (everything after the last FROM), as KEY=VALUE pairs. Only the
# `ENV KEY=VALUE [KEY=VALUE...]` form without quotes or continuations is understood; anything else
# fails loudly rather than being misread.
mapfile -t IMAGE_ENV < <(awk '
  toupper($1) == "FROM" { delete envs; n = 0 }
  toupper($1) == "ENV" {
    if ($0 ~ /["'"'"'\\]/) { envs[++n] = "UNSUPPORTED:" $0; next }
    for (i = 2; i <= NF; i++) {
      if ($i !~ /^[A-Za-z_][A-Za-z0-9_]*=/) { envs[++n] = "UNSUPPORTED:" $0; next }
      envs[++n] = $i
    }
  }
  END { for (i = 1; i <= n; i++) print envs[i] }
' "$DOCKERFILE")
[[ ${#IMAGE_ENV[@]} -gt 0 ]] || fail "found no ENV lines in the final stage of the Dockerfile"
for pair in "${IMAGE_ENV[@]}"; do
  [[ "$pair" != UNSUPPORTED:* ]] || fail "cannot parse Dockerfile line: ${pair#UNSUPPORTED:}"
done
say "final stage ENV: ${IMAGE_ENV[*]}"

# Deliberate overrides of the image's ENV:
# - DATABASE_PATH: the image uses /data, its volume; on this machine /data may not exist or be writable,
#   and the smoke test must not touch it. A fresh temp dir stands in for the empty volume.
# - PORT: the image listens on 8056, which may be taken here (a running keyward, a parallel CI job).
#   A free port is picked instead; the HEALTHCHECK below reads it from $PORT just as it does in the image.
PORT="$(node -e 'const s = require("node:net").createServer(); s.listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); })')"
RUNTIME_ENV=()
for pair in "${IMAGE_ENV[@]}"; do
  case "${pair%%=*}" in
    DATABASE_PATH|PORT) ;;
    *) RUNTIME_ENV+=("$pair") ;;
  esac
done
RUNTIME_ENV+=(
  "PATH=$PATH"
  "ADMIN_API_TOKEN=$(openssl rand -hex 32)"
  "DATABASE_PATH=$WORK/data/keyward.db"
  "PORT=$PORT"
)

# The image's CMD, with `env -i`: nothing from this shell leaks in except the variables above.
say "starting node dist/src/server.js on port $PORT"
(cd "$APP" && exec env -i "${RUNTIME_ENV[@]}" node dist/src/server.js) >"$LOG" 2>&1 &
SERVER_PID=$!

healthy=""
for _ in $(seq 1 60); do
  kill -0 "$SERVER_PID" 2>/dev/null || fail "the server exited before answering /healthz"
  if [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/healthz" || true)" == "200" ]]; then
    healthy=yes
    break
  fi
  sleep 0.5
done
[[ -n "$healthy" ]] || fail "/healthz did not answer 200 within 30 s"
say "/healthz 200"

status="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/readyz" || true)"
[[ "$status" == "200" ]] || fail "/readyz answered $status, expected 200"
status="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/openapi.json" || true)"
[[ "$status" == "200" ]] || fail "/openapi.json answered $status, expected 200 (is openapi/ copied?)"
status="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/sso/" || true)"
[[ "$status" == "200" ]] || fail "/sso/ answered $status, expected 200 (is public/ copied?)"
status="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/metrics" || true)"
[[ "$status" == "200" ]] || fail "/metrics answered $status to this machine, expected 200 (prom-client in the runtime dependencies?)"
say "/readyz 200, /openapi.json 200, /sso/ 200, /metrics 200"

# The README's `docker exec keyward node dist/src/cli.js backup …`: the image's environment is enough
# to find the database, and the copy is made while the server runs.
(cd "$APP" && env -i "${RUNTIME_ENV[@]}" node dist/src/cli.js backup "$WORK/backup.db") || fail "keyward backup failed in the runtime image"
[[ "$(head -c 15 "$WORK/backup.db")" == "SQLite format 3" ]] || fail "the backup is not a SQLite database"
say "node dist/src/cli.js backup: a copy while serving"

# The Dockerfile's own HEALTHCHECK command (exec form, JSON array after CMD), run as the image would:
# in the app dir with the container's environment.
mapfile -d '' -t HEALTHCHECK < <(node -e '
  const text = require("node:fs").readFileSync(process.argv[1], "utf8").replace(/\\\r?\n/g, " ");
  const line = text.split("\n").find((l) => /^\s*HEALTHCHECK\b/i.test(l));
  if (!line) { console.error("no HEALTHCHECK in the Dockerfile"); process.exit(1); }
  const m = /\bCMD\s+(\[.*\])\s*$/.exec(line);
  if (!m) { console.error("HEALTHCHECK is not in exec form: " + line); process.exit(1); }
  process.stdout.write(JSON.parse(m[1]).join("\0") + "\0");
' "$DOCKERFILE")
[[ ${#HEALTHCHECK[@]} -gt 0 ]] || fail "could not read the HEALTHCHECK command from the Dockerfile"
if ! (cd "$APP" && env -i "${RUNTIME_ENV[@]}" "${HEALTHCHECK[@]}"); then
  fail "the Dockerfile's HEALTHCHECK command failed"
fi
say "HEALTHCHECK command exits 0"

# docker stop sends SIGTERM: keyward must stop cleanly and exit 0.
kill -TERM "$SERVER_PID"
code=""
for _ in $(seq 1 40); do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    code=0
    wait "$SERVER_PID" || code=$?
    break
  fi
  sleep 0.25
done
[[ -n "$code" ]] || fail "the server did not exit within 10 s of SIGTERM"
SERVER_PID=""
[[ "$code" == "0" ]] || fail "the server exited $code after SIGTERM, expected 0"
grep -q '"msg":"stopped"' "$LOG" || fail "the server did not log \"stopped\" on SIGTERM"
say "SIGTERM: stopped, exit 0"

say "PASS"
