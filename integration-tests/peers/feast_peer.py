#!/usr/bin/env python3
"""Feast peer for the adserve benchmarks: a seeded Feast repo on Redis, served by `feast serve`.

Run it with the bench venv's interpreter ($ADSTACK_HOME/bench-venv/bin/python, see
install.sh next to this file).

Subcommands
-----------
setup  Writes a Feast feature repo into --repo (feature_store.yaml, features.py, a file
       registry and parquet offline data under DIR/data), applies it (what `feast apply`
       does) and writes deterministic values for user ids ``bench-user-0 .. N-1`` and ad ids
       ``S .. S+M-1`` into the Redis online store (logical db --redis-db, default 1).
       ``--ad-ids-file FILE`` (integers, one per line) seeds exactly those ad ids instead,
       row j of the ad matrix going to the j-th id of the file (duplicates dropped).
       Idempotent: re-running with the same arguments rewrites the same values.
       ``--flush-db`` first empties that Redis db (refused for db 0).

       feast_peer.py setup --repo DIR --redis 127.0.0.1:6379 --redis-db 1 \\
           --users 2000 --ads 5000 --ad-id-start 1 --user-features 50 --ad-features 30 --seed 7

serve  execs the Feast Python HTTP feature server (gunicorn + one uvicorn worker) on
       127.0.0.1:PORT. Access log off, registry cache never expires and is not polled,
       and no worker recycling (Feast's CLI default recycles the worker every ~1000
       requests, which would put restarts inside a benchmark).

       feast_peer.py serve --repo DIR --port 6566

       Ready when ``GET /health`` answers 200: 5-8 s here (importing Feast is slow), so
       wait up to ~30 s.  The process keeps its pid through the exec and becomes the
       gunicorn master: SIGTERM to it stops the worker too.  gunicorn logs a few INFO lines
       and Feast one "auth_type=no_auth" WARNING to stderr at start; nothing per request.
       The registry is read once at start: restart the server after re-running setup.

probe  Sends forms (a), (b) and (b2) below to a running server, checks every value is
       non-null and equal to the seeded one, and prints rough sequential latencies
       (informative only)::

       feast_peer.py probe --port 6566 --users 2000 --ads 5000 --k 1000

Repo layout written by setup
----------------------------
project ``adserve_bench``; entities ``user`` (join key ``user_id``, STRING) and ``ad``
(join key ``ad_id``, INT64); feature views ``user_features`` (``uf_00`` .. ``uf_49``,
float32) and ``ad_features`` (``af_00`` .. ``af_29``, float32), ttl 100 years, event
timestamp 2025-01-01T00:00:00Z.  Values: ``numpy.random.default_rng([seed, 0])`` draws a
float32 uniform [0,1) matrix of shape (users, user_features) -- row i is ``bench-user-i``;
``default_rng([seed, 1])`` draws (ads, ad_features) -- row j is ad id ``S + j`` (or the
j-th id of --ad-ids-file).

HTTP contract the load generator uses
-------------------------------------
``POST http://127.0.0.1:PORT/get-online-features`` with header
``Content-Type: application/json`` (without it FastAPI answers 422).  Features are named
``"<feature_view>:<feature>"``; ``entities`` maps each join key to a column (a list); all
columns have the same length, one entry per entity row.

(a) one user, 50 user features::

    {"features": ["user_features:uf_00", "user_features:uf_01", ..., "user_features:uf_49"],
     "entities": {"user_id": ["bench-user-17"]}}

(b) one user + K ads (50 user + 30 ad features) in ONE request: K entity rows, the user id
    repeated K times (Feast de-duplicates entity keys per feature view before reading
    Redis, so the user hash is fetched once, but the response repeats its 50 values K
    times)::

    {"features": ["user_features:uf_00", ..., "user_features:uf_49",
                  "ad_features:af_00", ..., "ad_features:af_29"],
     "entities": {"user_id": ["bench-user-17", "bench-user-17", ...K times...],
                  "ad_id":   [1, 2, ..., K]}}

    ad ids are JSON integers (int64 join key); user ids are strings.  Every feature view
    named in ``features`` needs its join key in ``entities`` (else HTTP 500).

(b2) the same data as two requests: form (a), then the K ads alone::

    {"features": ["ad_features:af_00", ..., "ad_features:af_29"], "entities": {"ad_id": [1, ..., K]}}

    About half the time of (b) at K=1000, because the response carries 30K instead of 80K
    values; which of (b) / (b2) the benchmark uses is its call, but say which.

Successful response: HTTP 200, column-major: one ``results`` entry per output column, each
with ``values`` / ``statuses`` / ``event_timestamps`` holding one element per entity row;
``metadata.feature_names`` names the columns in the same order -- the join keys first
(order of ``entities``), then the features.  Exact response for form (b) with
``features: [user_features:uf_00, user_features:uf_01, ad_features:af_00]``, user
``bench-user-17``, ads ``[1, 2]`` (seed 7)::

    {"results": [
       {"values": ["bench-user-17", "bench-user-17"], "statuses": ["PRESENT", "PRESENT"],
        "event_timestamps": ["1970-01-01T00:00:00Z", "1970-01-01T00:00:00Z"]},
       {"values": [1, 2], "statuses": ["PRESENT", "PRESENT"],
        "event_timestamps": ["1970-01-01T00:00:00Z", "1970-01-01T00:00:00Z"]},
       {"values": [0.9583500027656555, 0.9583500027656555], "statuses": ["PRESENT", "PRESENT"],
        "event_timestamps": ["2025-01-01T00:00:00Z", "2025-01-01T00:00:00Z"]},
       {"values": [0.6554267406463623, 0.6554267406463623], "statuses": ["PRESENT", "PRESENT"],
        "event_timestamps": ["2025-01-01T00:00:00Z", "2025-01-01T00:00:00Z"]},
       {"values": [0.8702600002288818, 0.9236853718757629], "statuses": ["PRESENT", "PRESENT"],
        "event_timestamps": ["2025-01-01T00:00:00Z", "2025-01-01T00:00:00Z"]}],
     "metadata": {"feature_names": ["user_id", "ad_id", "uf_01", "uf_00", "af_00"]}}

Reading it -- three Feast 0.67 quirks:

* Feature columns are NOT in request order: within a feature view the order comes from a
  Python set and changes from one server process to the next (uf_01 before uf_00 above).
  Always map columns through ``metadata.feature_names``.  Names are bare (``uf_00``)
  unless the request sets ``"full_feature_names": true`` (then ``user_features__uf_00``).
* An entity that is not in Redis is NOT reported as ``NOT_FOUND`` by the Redis online
  store: its status is still ``"PRESENT"``, its value ``null`` and its event timestamp
  ``"1970-01-01T00:00:00Z"``.  So "found" means: every value of every feature column is a
  JSON number (not ``null``) -- check values, not statuses.  (Checking that feature
  timestamps are ``"2025-01-01T00:00:00Z"`` works too.)
* Errors: an unknown feature or a missing join key is HTTP 500 whose body is a JSON
  string (e.g. ``"'Feature nope not found in projection user_features'"``); a body that is
  not an object is 422 ``{"detail": [...]}``.

``GET /health`` answers 200 with an empty body once the worker is up.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

PROJECT = "adserve_bench"
EVENT_TS = datetime(2025, 1, 1, tzinfo=UTC)
USER_PREFIX = "bench-user-"


def user_feature_names(n: int) -> list[str]:
    return [f"uf_{i:02d}" for i in range(n)]


def ad_feature_names(n: int) -> list[str]:
    return [f"af_{i:02d}" for i in range(n)]


def user_values(seed: int, users: int, n_features: int):
    import numpy as np

    return np.random.default_rng([seed, 0]).random((users, n_features), dtype=np.float32)


def ad_values(seed: int, ads: int, n_features: int):
    import numpy as np

    return np.random.default_rng([seed, 1]).random((ads, n_features), dtype=np.float32)


def ad_id_list(args: argparse.Namespace) -> list[int]:
    """The seeded ad ids: --ad-ids-file (integers separated by newlines, spaces or commas;
    duplicates dropped, file order kept) when given, else S .. S+M-1."""
    if args.ad_ids_file:
        text = Path(args.ad_ids_file).read_text().replace(",", " ")
        ids = list(dict.fromkeys(int(t) for t in text.split()))
        if not ids:
            raise SystemExit(f"{args.ad_ids_file}: no ad ids")
        return ids
    return list(range(args.ad_id_start, args.ad_id_start + args.ads))


def parse_hostport(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {s!r}")
    return host, int(port)


# --------------------------------------------------------------------------- setup

FEATURE_STORE_YAML = """\
# Written by integration-tests/peers/feast_peer.py setup; rewritten on every setup.
project: {project}
provider: local
registry:
  registry_type: file
  path: {registry}
  cache_ttl_seconds: 0      # 0 = load once, never expire (no registry re-reads while serving)
online_store:
  type: redis
  connection_string: "{host}:{port},db={db}"
  skip_dedup: true          # plain overwrite on write, so re-running setup is idempotent
offline_store:
  type: file
entity_key_serialization_version: 3
"""

FEATURES_PY = '''\
# Written by integration-tests/peers/feast_peer.py setup; rewritten on every setup.
# `feast apply` in this directory registers the same objects setup applies.
from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float32

USER_FEATURES = {user_features!r}
AD_FEATURES = {ad_features!r}

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING)
ad = Entity(name="ad", join_keys=["ad_id"], value_type=ValueType.INT64)

user_source = FileSource(
    name="user_features_source",
    path="data/user_features.parquet",
    timestamp_field="event_timestamp",
)
ad_source = FileSource(
    name="ad_features_source",
    path="data/ad_features.parquet",
    timestamp_field="event_timestamp",
)

user_features = FeatureView(
    name="user_features",
    entities=[user],
    ttl=timedelta(days=36500),
    schema=[Field(name=n, dtype=Float32) for n in USER_FEATURES],
    online=True,
    source=user_source,
)
ad_features = FeatureView(
    name="ad_features",
    entities=[ad],
    ttl=timedelta(days=36500),
    schema=[Field(name=n, dtype=Float32) for n in AD_FEATURES],
    online=True,
    source=ad_source,
)
'''


def cmd_setup(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.flush_db and args.redis_db == 0:
        print("refusing --flush-db on Redis db 0 (shared with the project)", file=sys.stderr)
        return 2
    repo = Path(args.repo).resolve()
    data = repo / "data"
    data.mkdir(parents=True, exist_ok=True)
    host, port = args.redis

    if args.flush_db:
        import redis

        redis.Redis(host=host, port=port, db=args.redis_db).flushdb()

    (repo / "feature_store.yaml").write_text(
        FEATURE_STORE_YAML.format(
            project=PROJECT,
            registry=str(data / "registry.db"),
            host=host,
            port=port,
            db=args.redis_db,
        )
    )
    (repo / "features.py").write_text(
        FEATURES_PY.format(
            user_features=user_feature_names(args.user_features),
            ad_features=ad_feature_names(args.ad_features),
        )
    )

    import numpy as np
    import pandas as pd

    ufn = user_feature_names(args.user_features)
    afn = ad_feature_names(args.ad_features)
    uv = user_values(args.seed, args.users, args.user_features)
    ad_ids = ad_id_list(args)
    av = ad_values(args.seed, len(ad_ids), args.ad_features)
    users_df = pd.DataFrame(uv, columns=ufn)
    users_df.insert(0, "user_id", [f"{USER_PREFIX}{i}" for i in range(args.users)])
    users_df["event_timestamp"] = pd.Timestamp(EVENT_TS)
    ads_df = pd.DataFrame(av, columns=afn)
    ads_df.insert(0, "ad_id", np.asarray(ad_ids, dtype=np.int64))
    ads_df["event_timestamp"] = pd.Timestamp(EVENT_TS)
    # The offline store (FileSource) holds the same rows, so `feast materialize` would agree.
    users_df.to_parquet(data / "user_features.parquet", index=False)
    ads_df.to_parquet(data / "ad_features.parquet", index=False)
    t_data = time.perf_counter()

    from feast import FeatureStore

    # What `feast apply` does: load the definitions in features.py and apply them.
    spec = importlib.util.spec_from_file_location("adserve_bench_features", repo / "features.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    store = FeatureStore(repo_path=str(repo))
    store.apply([mod.user, mod.ad, mod.user_features, mod.ad_features])
    t_apply = time.perf_counter()

    # Direct write to the online store (the fastest correct path: no offline query).
    # Chunked so a large N or M never builds one huge Redis pipeline.
    chunk = 2000
    for name, df in (("user_features", users_df), ("ad_features", ads_df)):
        for start in range(0, len(df), chunk):
            store.write_to_online_store(name, df.iloc[start : start + chunk])
    t_write = time.perf_counter()

    summary = {
        "repo": str(repo),
        "redis": f"{host}:{port}/{args.redis_db}",
        "users": args.users,
        "ads": len(ad_ids),
        "ad_id_min_max": [min(ad_ids), max(ad_ids)],
        "seconds": {
            "data": round(t_data - t0, 2),
            "apply": round(t_apply - t_data, 2),
            "write_online": round(t_write - t_apply, 2),
        },
    }
    print(json.dumps(summary))
    return 0


# --------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    repo = Path(args.repo).resolve()
    if not (repo / "feature_store.yaml").is_file():
        print(f"{repo}/feature_store.yaml missing: run `setup` first", file=sys.stderr)
        return 2
    feast_bin = Path(sys.executable).parent / "feast"
    if not feast_bin.exists():
        found = shutil.which("feast")
        if not found:
            print("feast CLI not found next to this interpreter or on PATH", file=sys.stderr)
            return 2
        feast_bin = Path(found)
    argv = [
        str(feast_bin),
        "--chdir", str(repo),
        "--log-level", args.log_level,
        "serve",
        "--host", args.host,
        "--port", str(args.port),
        "--type", "http",
        "--workers", "1",
        "--no-access-log",
        "--max-requests", "0",        # gunicorn: 0 = never recycle the worker
        "--max-requests-jitter", "0",
        "--registry_ttl_sec", "0",     # no background registry refresh timer
    ]
    # gunicorn (>= 25) opens a control socket at $XDG_RUNTIME_DIR/gunicorn.ctl, else at
    # ~/.gunicorn/gunicorn.ctl, shared by every gunicorn of the user; Feast's CLI cannot
    # turn it off, so give each repo its own.
    run_dir = repo / "run"
    run_dir.mkdir(exist_ok=True)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(run_dir))
    sys.stdout.flush()
    os.execve(argv[0], argv, env)
    return 0  # not reached


# --------------------------------------------------------------------------- probe


def _post(url: str, body: dict) -> tuple[int, dict, float]:
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            code = resp.status
    except urllib.error.HTTPError as e:
        raw, code = e.read(), e.code
    dt = time.perf_counter() - t
    return code, json.loads(raw), dt


def body_user(user: str, n_uf: int) -> dict:
    return {
        "features": [f"user_features:{n}" for n in user_feature_names(n_uf)],
        "entities": {"user_id": [user]},
    }


def body_ads(ad_ids: list[int], n_af: int) -> dict:
    return {
        "features": [f"ad_features:{n}" for n in ad_feature_names(n_af)],
        "entities": {"ad_id": ad_ids},
    }


def body_user_ads(user: str, ad_ids: list[int], n_uf: int, n_af: int) -> dict:
    return {
        "features": [f"user_features:{n}" for n in user_feature_names(n_uf)]
        + [f"ad_features:{n}" for n in ad_feature_names(n_af)],
        "entities": {"user_id": [user] * len(ad_ids), "ad_id": ad_ids},
    }


def check_response(resp: dict, join_keys: list[str], expected: dict) -> str | None:
    """None when every expected feature is present, non-null and equal to the seeded
    float32 values. Columns are matched by ``metadata.feature_names`` (Feast does not
    keep the request order)."""
    import numpy as np

    names = resp.get("metadata", {}).get("feature_names")
    results = resp.get("results")
    if not isinstance(names, list) or not isinstance(results, list) or len(names) != len(results):
        return "malformed response"
    if names[: len(join_keys)] != join_keys:
        return f"join keys first expected, got {names[: len(join_keys)]}"
    if sorted(names[len(join_keys) :]) != sorted(expected):
        return f"feature names differ: {names[len(join_keys):][:5]}..."
    for name, col in zip(names, results, strict=True):
        if name in join_keys:
            continue
        want = expected[name]
        vals = col["values"]
        if any(v is None for v in vals):
            return f"{name}: null values (entity not found)"
        if any(s != "PRESENT" for s in col["statuses"]):
            return f"{name}: statuses {set(col['statuses'])}"
        got = np.asarray(vals, dtype=np.float32)
        if got.shape != want.shape or not np.array_equal(got, want):
            return f"{name}: values differ from the seeded ones"
    return None


def cmd_probe(args: argparse.Namespace) -> int:
    import numpy as np

    url = f"http://{args.host}:{args.port}/get-online-features"
    uv = user_values(args.seed, args.users, args.user_features)
    all_ads = ad_id_list(args)
    av = ad_values(args.seed, len(all_ads), args.ad_features)
    ufn, afn = user_feature_names(args.user_features), ad_feature_names(args.ad_features)
    u = args.users - 1
    user = f"{USER_PREFIX}{u}"
    k = min(args.k, len(all_ads))
    ads = all_ads[:k]
    ok = True

    def run(label: str, body: dict, join_keys: list[str], expected: dict) -> None:
        nonlocal ok
        code, resp, _ = _post(url, body)
        err = None if code == 200 else f"HTTP {code}: {str(resp)[:300]}"
        err = err or check_response(resp, join_keys, expected)
        print(f"{label}: {'ok' if err is None else err}")
        ok &= err is None

    run(f"form a  (1 user x {len(ufn)})", body_user(user, len(ufn)), ["user_id"],
        {n: uv[u, j : j + 1] for j, n in enumerate(ufn)})
    exp_b = {n: np.repeat(uv[u, j], k) for j, n in enumerate(ufn)}
    exp_b |= {n: av[:k, j] for j, n in enumerate(afn)}
    run(f"form b  (1 user + {k} ads, one request)", body_user_ads(user, ads, len(ufn), len(afn)),
        ["user_id", "ad_id"], exp_b)
    run(f"form b2 ({k} ads only)", body_ads(ads, len(afn)), ["ad_id"],
        {n: av[:k, j] for j, n in enumerate(afn)})

    code, resp, _ = _post(url, body_user("no-such-user", len(ufn)))
    col = resp["results"][1]
    print(f"unknown user -> HTTP {code}, statuses {sorted(set(col['statuses']))}, "
          f"values {col['values']}, event_timestamps {col.get('event_timestamps')}")

    cases = [
        ("a  1 user", [body_user(f"{USER_PREFIX}0", len(ufn))]),
        (f"b  1 user + {k} ads", [body_user_ads(user, ads, len(ufn), len(afn))]),
        (f"b2 1 user, then {k} ads (2 requests)", [body_user(user, len(ufn)), body_ads(ads, len(afn))]),
    ]
    for label, bodies in cases:
        times = []
        for _ in range(args.repeat):
            total = 0.0
            for b in bodies:
                code, _, dt = _post(url, b)
                assert code == 200, code
                total += dt
            times.append(total * 1000)
        times.sort()
        print(
            f"{label}: n={len(times)} p50={times[len(times) // 2]:.1f} ms "
            f"min={times[0]:.1f} max={times[-1]:.1f} ms (sequential, urllib client, incl. JSON parse)"
        )
    return 0 if ok else 1


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def data_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--users", type=int, default=2000)
        sp.add_argument("--ads", type=int, default=5000)
        sp.add_argument("--ad-id-start", type=int, default=1)
        sp.add_argument(
            "--ad-ids-file",
            help="seed exactly these ad ids (one per line) instead of --ad-id-start .. +--ads",
        )
        sp.add_argument("--user-features", type=int, default=50)
        sp.add_argument("--ad-features", type=int, default=30)
        sp.add_argument("--seed", type=int, default=7)

    s = sub.add_parser("setup", help="write the repo, apply it, fill the online store")
    s.add_argument("--repo", required=True)
    s.add_argument("--redis", type=parse_hostport, default=("127.0.0.1", 6379), metavar="HOST:PORT")
    s.add_argument("--redis-db", type=int, default=1)
    s.add_argument("--flush-db", action="store_true", help="FLUSHDB the target db first (never db 0)")
    data_args(s)
    s.set_defaults(func=cmd_setup)

    v = sub.add_parser("serve", help="exec `feast serve` (HTTP, 1 worker) on HOST:PORT")
    v.add_argument("--repo", required=True)
    v.add_argument("--port", type=int, default=6566)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--log-level", default="WARNING")
    v.set_defaults(func=cmd_serve)

    q = sub.add_parser("probe", help="check both request forms against a running server")
    q.add_argument("--port", type=int, default=6566)
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--k", type=int, default=1000, help="ads in the form-b request")
    q.add_argument("--repeat", type=int, default=20)
    data_args(q)
    q.set_defaults(func=cmd_probe)

    args = p.parse_args(argv)
    if getattr(args, "users", 1) < 1 or getattr(args, "ads", 1) < 1:
        p.error("--users and --ads must be >= 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
