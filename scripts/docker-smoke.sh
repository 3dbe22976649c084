#!/usr/bin/env bash
# The Dockerfile's steps without Docker (`npm run docker:smoke`; CI runs it):
#   build stage:   clean dir with only what the build stage COPYs -> npm ci -> npm run build -> npm prune --omit=dev
#   runtime stage: clean dir with only what the final stage COPYs --from=build, the final stage's ENV only,
#                  the Dockerfile's CMD, then /healthz and the image's own HEALTHCHECK command.
#   README:        the quick start's Docker block as a person copies it (the admin key written to .env,
#                  passed with --env-file), then the walkthrough's ADMIN_TOKEN line against the server.
# It proves the image's file list and environment are enough to run keyward, that no dev
# dependency is shipped, and that the README's Docker path leaves the admin key known to its reader.
# Everything happens in a temp dir that is removed on exit.
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
# The README's Docker commands, as a person copies them, in a folder of their own: `docker build` is the
# two stages above; every other line but `docker run` runs verbatim; `docker run`'s --env-file and -e
# give the container's environment, exactly as Docker reads them (KEY=VALUE lines, no quoting).
README_BLOCK="$(node -e '
  const text = require("node:fs").readFileSync(process.argv[1], "utf8");
  const start = text.indexOf("<!-- docker:start"), end = text.indexOf("<!-- docker:end -->");
  const m = start >= 0 && end > start && /```bash\n([\s\S]*?)\n```/.exec(text.slice(start, end));
  if (!m) { console.error("README.md has no bash block between <!-- docker:start --> and <!-- docker:end -->"); process.exit(1); }
  process.stdout.write(m[1]);
' "$ROOT/README.md")" || fail "could not read the Docker commands from README.md"
USER_DIR="$WORK/user"
mkdir -p "$USER_DIR"
DOCKER_RUN=""
while IFS= read -r line; do
  case "$line" in
    "docker build "*) say "README: $line (the build and runtime stages above)" ;;
    "docker run "*) DOCKER_RUN="$line" ;;
    "") ;;
    *) say "README: running $line"; (cd "$USER_DIR" && bash -euo pipefail -c "$line") || fail "README line failed: $line" ;;
  esac
done <<< "$README_BLOCK"
[[ -n "$DOCKER_RUN" ]] || fail "the README's Docker block has no docker run line"
say "README: $DOCKER_RUN"
mapfile -t CONTAINER_ENV < <(cd "$USER_DIR" && node -e '
  const fs = require("node:fs");
  const args = process.argv[1].trim().split(/\s+/).slice(2);
  const env = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === "--env-file") {
      const file = args[++i];
      if ((fs.statSync(file).mode & 0o077) !== 0) { console.error(`${file} is readable by others`); process.exit(1); }
      for (const l of fs.readFileSync(file, "utf8").split("\n")) if (l.trim() && !l.startsWith("#")) env.push(l);
    } else if (a === "-e") env.push(args[++i]);
    else if (["-d", "--name", "-p", "-v"].includes(a)) { if (a !== "-d") i++; }
    else if (i === args.length - 1) { if (a !== "keyward") { console.error(`image ${a}, expected keyward`); process.exit(1); } }
    else { console.error(`docker run option ${a} is not understood by this smoke test`); process.exit(1); }
  }
  for (const e of env) console.log(e);
' "$DOCKER_RUN") || fail "could not follow the README's docker run line"
printf '%s\n' "${CONTAINER_ENV[@]}" | grep -q '^ADMIN_API_TOKEN=' || fail "the README's docker run gives the container no ADMIN_API_TOKEN"

RUNTIME_ENV=()
for pair in "${IMAGE_ENV[@]}" "${CONTAINER_ENV[@]}"; do
  case "${pair%%=*}" in
    DATABASE_PATH|PORT) ;;
    *) RUNTIME_ENV+=("$pair") ;;
  esac
done
RUNTIME_ENV+=(
  "PATH=$PATH"
  "DATABASE_PATH=$WORK/data/keyward.db"
  "PORT=$PORT"
)

# The Dockerfile's own CMD (exec form), with `env -i`: nothing from this shell leaks in except the
# variables above.
mapfile -d '' -t SERVER_CMD < <(node -e '
  const lines = require("node:fs").readFileSync(process.argv[1], "utf8").split("\n").filter((l) => /^CMD\s/.test(l));
  const m = /^CMD\s+(\[.*\])\s*$/.exec(lines[lines.length - 1] ?? "");
  if (!m) { console.error("the Dockerfile has no CMD in exec form"); process.exit(1); }
  process.stdout.write(JSON.parse(m[1]).join("\0") + "\0");
' "$DOCKERFILE")
[[ ${#SERVER_CMD[@]} -gt 0 ]] || fail "could not read the CMD from the Dockerfile"
say "starting ${SERVER_CMD[*]} on port $PORT"
(cd "$APP" && exec env -i "${RUNTIME_ENV[@]}" "${SERVER_CMD[@]}") >"$LOG" 2>&1 &
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

# The walkthrough's first line, in the same folder, finds the key the container was given.
ADMIN_LINE="$(grep -m1 '^export ADMIN_TOKEN=' "$ROOT/README.md")" || fail "the README walkthrough has no export ADMIN_TOKEN line"
status="$(cd "$USER_DIR" && bash -euo pipefail -c "$ADMIN_LINE"' && curl -s -o /dev/null -w "%{http_code}" -H "X-Admin-API-Key: $ADMIN_TOKEN" '"http://127.0.0.1:$PORT/admin/users")" || true
[[ "$status" == "200" ]] || fail "the walkthrough's ADMIN_TOKEN line gave a key that /admin/users answered $status to, expected 200"
say "README: the walkthrough's ADMIN_TOKEN from .env is the container's admin key (GET /admin/users 200)"

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
