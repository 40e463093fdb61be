"""The Helm chart, rendered offline (helm-python-sdk: Helm's Go SDK, no cluster,
no helm binary) with several value sets. Every service's rendered config.toml
is then handed to that service's own binary with ``--check-config``, so a key
the chart writes and the service does not accept (the services refuse unknown
keys) fails here rather than in a rollout.

Needs the debug binaries (``cargo build``; ``make test`` builds them first).
"""

from __future__ import annotations

import copy
import os
import pathlib
import subprocess
import tomllib

import helm_python as helm
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "adserve"
BIN = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug"
SERVICES = ["gateway", "feature-service", "ranker", "auction", "label-joiner"]

GPU = {
    "services": {
        "ranker": {
            "gpu": {"enabled": True},
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "config": {
                "model": {
                    "executionProviders": ["tensorrt", "cuda", "cpu"],
                    "tensorrt": {"fp16": True, "engineCacheDir": "/var/cache/adserve/trt"},
                },
                "batching": {"sessions": 1, "maxBatchRows": 4096, "maxQueueDelayUs": 2000},
            },
        }
    }
}
SECRETS = {
    "postgres": {"existingSecret": "adserve-postgres"},
    "dynamodb": {"existingSecret": "adserve-dynamodb"},
    "clickTokens": {"existingSecret": "adserve-click-keys"},
}
# A multi-objective auction with exploration and a diurnal pacing profile.
AUCTION = {
    "services": {
        "gateway": {
            "config": {
                "auction": {
                    "qualityExponent": 0.5,
                    "explorationShare": 0.05,
                    "objective": {"pctrWeight": 0, "pcvrWeight": 5.5, "ecpmWeight": 1},
                },
                "pacing": {"hourlyTraffic": [0.5] * 8 + [1.5] * 16},
                "frequencyCapPerDay": 3,
                "clickFilter": {"enabled": True, "userAgents": ["Googlebot", "AcmeMonitor/"]},
                "openrtb": {"placements": {"agltb3B1Yi1pbmNy": "feed_top", "side bar": "sidebar"}, "currency": "EUR", "clickUrl": "https://ads.example.com/v1/clicks/redirect", "billingUrl": "https://ads.example.com/openrtb2/billing"},
            }
        }
    }
}
OBJECT_STORAGE = {"services": {"label-joiner": {"config": {"outputUrl": "s3://bucket/rows", "mode": "streaming"}}}}
AGGREGATE_ONLY = {"services": {"feature-service": {"config": {"mode": "aggregate"}}}}
TLS = {"tls": {"enabled": True, "secretName": "adserve-internal-tls"}}
CASES = {
    "defaults": None,
    "tls": TLS,
    "gpu": GPU,
    "secrets": SECRETS,
    "auction": AUCTION,
    "object-storage": OBJECT_STORAGE,
    "aggregate-only": AGGREGATE_ONLY,
    "api-keys": {
        "services": {
            "gateway": {
                "config": {
                    "apiKeys": [{"publisher": "news-site", "sha256": "ab" * 32, "requestsPerSecond": 5, "burst": 10}]
                }
            }
        }
    },
}


def render(values: dict | None) -> dict[str, str]:
    return helm.Chart.load(str(CHART)).render(values=values, name="adserve")


def configs(manifests: dict[str, str]) -> dict[str, str]:
    """config.toml of each service's ConfigMap."""
    out = {}
    for doc in manifests["adserve/templates/configmap.yaml"].split("\n---"):
        for svc in SERVICES:
            if f"name: adserve-{svc}\n" in doc and "config.toml: |" in doc:
                body = doc.split("config.toml: |", 1)[1].splitlines()[1:]
                out[svc] = "\n".join(line[4:] for line in body)
    return out


TLS_DIR = "/etc/adserve/tls"


def tls_files(d: pathlib.Path) -> pathlib.Path:
    """ca.crt, tls.crt and tls.key in ``d`` (as a kubernetes.io/tls Secret
    from cert-manager mounts them): a CA, and a leaf it signed."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if (d / "tls.key").exists():
        return d
    d.mkdir(parents=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer: str, signer, ca: bool) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("adserve-ranker")]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("adserve test CA", ca_key, "adserve test CA", ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = cert("adserve-ranker", key, "adserve test CA", ca_key, False)
    pem = serialization.Encoding.PEM
    (d / "ca.crt").write_bytes(ca.public_bytes(pem))
    (d / "tls.crt").write_bytes(leaf.public_bytes(pem))
    (d / "tls.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return d


def binary(svc: str) -> pathlib.Path:
    name = "adserve-auction" if svc == "auction" else f"adserve-{svc}"
    path = BIN / name
    assert path.exists(), f"{path} not built: run cargo build (make test does)"
    return path


@pytest.mark.parametrize("case", CASES)
def test_every_rendered_config_is_accepted_by_its_service(case: str, tmp_path: pathlib.Path) -> None:
    rendered = configs(render(CASES[case]))
    assert sorted(rendered) == sorted(SERVICES)
    for svc, text in rendered.items():
        tomllib.loads(text)
        path = tmp_path / f"{svc}.toml"
        path.write_text(text)
        # Only the file: no ADSERVE_* from the caller's environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADSERVE_")}
        env["ADSERVE_CONFIG"] = str(path)
        if svc == "ranker":
            # The image's model path does not exist on this machine.
            env["ADSERVE_MODEL__DIR"] = str(REPO / "models" / "ctr-baseline")
        if TLS_DIR in text:
            # The mounted Secret, as certificates of a test CA on this machine.
            path.write_text(text.replace(TLS_DIR, str(tls_files(tmp_path / "tls"))))
        out = subprocess.run(
            [str(binary(svc)), "--check-config"], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, f"{case}: adserve-{svc} refused the chart's config:\n{out.stderr}\n{text}"


def test_the_ranker_fallback_and_rollback_values_reach_the_ranker() -> None:
    defaults = tomllib.loads(configs(render(None))["ranker"])
    assert defaults["fallback"] == {"enabled": True, "reserve": "20ms"}, "empty values keep the ranker's defaults"
    assert defaults["registry"]["keep_previous"] == "600s"
    assert defaults["registry"]["load_timeout"] == "600s"
    assert defaults["shadow"]["sample_share"] == 1.0
    values = {
        "services": {
            "ranker": {
                "config": {
                    "fallback": {"reserveMs": 35, "modelDir": "/models/lr", "priorFeature": "ad_ctr_7d"},
                    "registry": {"keepPreviousSeconds": 0, "loadTimeoutSeconds": 5400},
                    "shadow": {"sampleShare": 0.1},
                }
            }
        }
    }
    ranker = tomllib.loads(configs(render(values))["ranker"])
    assert ranker["fallback"] == {
        "enabled": True,
        "reserve": "35ms",
        "model_dir": "/models/lr",
        "prior_feature": "ad_ctr_7d",
    }
    assert ranker["registry"]["keep_previous"] == "0s"
    assert ranker["registry"]["load_timeout"] == "5400s"
    assert ranker["shadow"]["sample_share"] == 0.1


def test_the_auction_values_reach_the_gateway() -> None:
    gateway = tomllib.loads(configs(render(AUCTION))["gateway"])
    assert gateway["auction"]["objective"] == {"pctr_weight": 0, "pcvr_weight": 5.5, "ecpm_weight": 1}
    assert gateway["auction"]["quality_exponent"] == 0.5
    assert gateway["pacing"]["hourly_traffic"] == [0.5] * 8 + [1.5] * 16
    assert gateway["frequency_cap_per_day"] == 3
    assert gateway["click_filter"] == {"enabled": True, "user_agents": ["Googlebot", "AcmeMonitor/"]}
    defaults_filter = tomllib.loads(configs(render(None))["gateway"])["click_filter"]
    assert defaults_filter == {"enabled": True}, "the built-in list unless replaced"
    assert gateway["counters"]["url"] == "redis://redis:6379/0"
    assert gateway["openrtb"]["placements"] == {"agltb3B1Yi1pbmNy": "feed_top", "side bar": "sidebar"}
    assert (gateway["openrtb"]["currency"], gateway["openrtb"]["network_allowance"]) == ("EUR", "10ms")
    assert gateway["openrtb"]["click_url"] == "https://ads.example.com/v1/clicks/redirect"
    assert gateway["openrtb"]["billing_url"] == "https://ads.example.com/openrtb2/billing"
    assert gateway["catalog_index"] == {"enabled": True, "refresh": "30000ms", "debounce": "50ms", "max_staleness": "300000ms"}
    assert gateway["prediction_cache"] == {
        "enabled": True,
        "ttl": "10000ms",
        "max_entries": 200000,
        "mantissa_bits": 23,
        "refresh": "1000ms",
        "shadow_share": 0.1,
    }
    defaults = tomllib.loads(configs(render(None))["gateway"])
    assert "objective" not in defaults["auction"]
    assert "reserve_ecpm_micros" not in tomllib.loads(configs(render(None))["auction"])


def test_the_gpu_values_reach_the_ranker_and_only_the_ranker() -> None:
    manifests = render(GPU)
    ranker = tomllib.loads(configs(manifests)["ranker"])
    assert ranker["model"]["execution_providers"] == ["tensorrt", "cuda", "cpu"]
    assert ranker["model"]["tensorrt"]["engine_cache_dir"] == "/var/cache/adserve/trt"
    assert ranker["batching"]["max_queue_delay"] == "2000us"
    assert ranker["batching"]["predict_misses"] is True
    deployments = manifests["adserve/templates/deployment.yaml"].split("\n---")
    with_gpu = [d for d in deployments if "nvidia.com/gpu: " in d]
    assert len(with_gpu) == 1 and "name: adserve-ranker\n" in with_gpu[0]
    # Kubernetes must not inject ADSERVE_*_SERVICE_HOST variables the
    # services would refuse as unknown config keys.
    assert all("enableServiceLinks: false" in d for d in deployments if "kind: Deployment" in d)


def test_secrets_replace_urls_in_the_configs() -> None:
    manifests = render(SECRETS)
    rendered = configs(manifests)
    assert "url" not in tomllib.loads(rendered["gateway"])["postgres"]
    assert "url" not in tomllib.loads(rendered["ranker"])["registry"]["postgres"]
    deployments = manifests["adserve/templates/deployment.yaml"]
    assert "ADSERVE_POSTGRES__URL" in deployments and "ADSERVE_REGISTRY__POSTGRES__URL" in deployments


def test_no_credential_is_ever_written_into_a_configmap() -> None:
    values = {"dynamodb": {"accessKeyId": "AKIDEXAMPLE", "secretAccessKey": "s3cr3t-key"}}
    manifests = render(values)
    configmaps = manifests["adserve/templates/configmap.yaml"]
    for secret in ("adserve:adserve@", "s3cr3t-key", "AKIDEXAMPLE"):
        assert secret not in configmaps, secret
    rendered = configs(manifests)
    assert "url" not in tomllib.loads(rendered["gateway"])["postgres"]
    assert "url" not in tomllib.loads(rendered["ranker"])["registry"]["postgres"]
    assert "secret_access_key" not in tomllib.loads(rendered["feature-service"])["dynamodb"]
    # The chart's own Secrets hold them, and the pods read them from there.
    secrets = manifests["adserve/templates/secret.yaml"]
    assert "name: adserve-postgres" in secrets and "postgres://adserve:adserve@postgres:5432/adserve" in secrets
    assert "name: adserve-dynamodb" in secrets and "s3cr3t-key" in secrets
    deployments = manifests["adserve/templates/deployment.yaml"]
    assert deployments.count("name: adserve-postgres") == 2, "gateway and ranker"
    assert "name: adserve-dynamodb" in deployments
    # With existing Secrets the chart makes none of its own.
    assert "kind: Secret" not in render(SECRETS).get("adserve/templates/secret.yaml", "")


def test_grpc_reflection_is_off_unless_asked_for() -> None:
    for svc, text in configs(render(None)).items():
        assert tomllib.loads(text)["server"]["reflection"] is False, svc
    for svc, text in configs(render({"grpcReflection": True})).items():
        assert tomllib.loads(text)["server"]["reflection"] is True, svc


def test_the_feature_service_aggregates_from_the_releases_kafka() -> None:
    features = tomllib.loads(configs(render(None))["feature-service"])
    assert features["mode"] == "both"
    assert features["aggregates"]["kafka"]["brokers"] == "kafka:9092"
    assert features["aggregates"]["group_id"] == "adserve-feature-aggregates"
    serve_only = {"services": {"feature-service": {"config": {"mode": "serve"}}}}
    assert "aggregates" not in tomllib.loads(configs(render(serve_only))["feature-service"])


def test_the_ad_table_and_breaker_values_reach_the_feature_service() -> None:
    features = tomllib.loads(configs(render(None))["feature-service"])
    assert features["ad_table"] == {"enabled": True, "refresh": "1000ms", "max_age": "300000ms"}
    assert features["breaker"] == {"failures": 5, "cooldown": "1000ms"}
    tuned = {"services": {"feature-service": {"config": {"adTable": {"enabled": False}, "breaker": {"failures": 2}}}}}
    features = tomllib.loads(configs(render(tuned))["feature-service"])
    assert features["ad_table"]["enabled"] is False and features["breaker"]["failures"] == 2


def test_topics_are_replicated_by_default() -> None:
    rendered = configs(render(None))
    for svc in ("gateway", "label-joiner"):
        assert tomllib.loads(rendered[svc])["kafka"]["replication"] == 3, svc


@pytest.mark.parametrize(
    "values, message",
    [
        ({"services": {"ranker": {"config": {"model": {"executionProviders": ["gpu"]}}}}}, "executionProviders"),
        ({"services": {"label-joiner": {"config": {"labelWindowMs": 0}}}}, "labelWindowMs must be > 0"),
        ({"services": {"label-joiner": {"persistence": {"enabled": False}}}}, "never written to an emptyDir"),
        (
            {"services": {"label-joiner": {"config": {"outputUrl": "gs://b/x"}}}},
            "outputUrl must be s3://",
        ),
        ({"services": {"label-joiner": {"replicaCount": 2}}}, "needs persistence.accessModes [ReadWriteMany]"),
        ({"services": {"feature-service": {"config": {"mode": "all"}}}}, "mode must be serve, aggregate or both"),
        ({"services": {"feature-service": {"config": {"breaker": {"failures": 0}}}}}, "breaker.failures"),
        ({"tls": {"enabled": True}}, "tls.secretName must name"),
    ],
)
def test_bad_values_are_refused_at_render(values: dict, message: str) -> None:
    with pytest.raises(helm.HelmError) as err:
        render(values)
    assert message in str(err.value)


def test_label_joiner_instances_share_one_persistent_dataset() -> None:
    values = {"services": {"label-joiner": {"replicaCount": 3, "persistence": {"accessModes": ["ReadWriteMany"]}}}}
    manifests = render(values)
    deployments = manifests["adserve/templates/deployment.yaml"]
    joiner = next(d for d in deployments.split("\n---") if "name: adserve-label-joiner\n" in d)
    assert "replicas: 3" in joiner
    assert "persistentVolumeClaim" in joiner and "emptyDir: {}" in joiner  # tmp only
    assert joiner.count("emptyDir") == 1, "only /tmp is an emptyDir"
    assert "ReadWriteMany" in manifests["adserve/templates/pvc.yaml"]
    config = tomllib.loads(configs(manifests)["label-joiner"])
    assert config["mode"] == "window" and config["allowed_lateness"] == "3000ms"


def test_label_joiner_on_object_storage_mounts_no_volume() -> None:
    values = {
        "services": {
            "label-joiner": {
                "replicaCount": 2,
                "config": {"outputUrl": "s3://bucket/rows", "s3": {"endpoint": "https://minio.local:9000"}},
            }
        }
    }
    manifests = render(values)
    joiner = next(d for d in manifests["adserve/templates/deployment.yaml"].split("\n---") if "name: adserve-label-joiner\n" in d)
    assert "replicas: 2" in joiner and "persistentVolumeClaim" not in joiner
    assert "adserve-label-joiner-data" not in manifests.get("adserve/templates/pvc.yaml", "")
    config = tomllib.loads(configs(manifests)["label-joiner"])
    assert config["output_url"] == "s3://bucket/rows"
    assert config["s3"] == {"endpoint": "https://minio.local:9000", "region": "", "allow_http": False}


def test_the_impression_log_timeout_is_the_gateways_own_and_fits_its_budget(tmp_path: pathlib.Path) -> None:
    rendered = configs(render(None))
    gateway = tomllib.loads(rendered["gateway"])
    assert gateway["kafka"]["publish_timeout"] == "150ms"
    assert gateway["deadlines"]["request"] == "500ms"
    # The other services keep the release-wide timeout.
    assert tomllib.loads(rendered["label-joiner"])["kafka"]["publish_timeout"] == "2000ms"
    # A budget that cannot hold the log's reserve is refused by the gateway itself.
    tight = {"services": {"gateway": {"config": {"publishTimeoutMs": 600, "deadlines": {"requestMs": 500}}}}}
    path = tmp_path / "gateway.toml"
    path.write_text(configs(render(tight))["gateway"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADSERVE_")}
    env["ADSERVE_CONFIG"] = str(path)
    out = subprocess.run([str(binary("gateway")), "--check-config"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "deadlines.request" in out.stderr, out.stderr


def test_the_gateway_reads_its_click_token_keys_from_a_secret() -> None:
    import json
    import re

    manifests = render(None)
    secrets = manifests["adserve/templates/secret.yaml"]
    assert "name: adserve-click-tokens" in secrets
    keys = json.loads(json.loads(re.search(r"\n  keys: (.+)\n", secrets + "\n").group(1)))
    # One generated key: 64 hex digits, as the gateway accepts (32 bytes).
    assert len(keys) == 1 and re.fullmatch(r"[0-9a-f]{64}", keys[0]), keys
    assert keys != json.loads(json.loads(re.search(r"\n  keys: (.+)\n", render(None)["adserve/templates/secret.yaml"] + "\n").group(1))), "a fresh install draws its own key"
    deployments = manifests["adserve/templates/deployment.yaml"]
    assert deployments.count("ADSERVE_CLICK_TOKENS__KEYS") == 1, "the gateway, and only it"
    assert "click_tokens" not in configs(manifests)["gateway"], "keys never go into the ConfigMap"
    mine = render({"clickTokens": {"existingSecret": "my-click-keys"}})
    assert "adserve-click-tokens" not in mine.get("adserve/templates/secret.yaml", "")
    assert "name: my-click-keys" in mine["adserve/templates/deployment.yaml"]


def test_price_keys_reach_only_the_gateway_from_a_secret() -> None:
    assert "PRICE_KEYS" not in render(None)["adserve/templates/deployment.yaml"], "off unless a Secret is named"
    manifests = render({"openrtbPriceKeys": {"existingSecret": "exchange-price-keys"}})
    deployments = manifests["adserve/templates/deployment.yaml"]
    for var in ("ADSERVE_OPENRTB__PRICE_KEYS__ENCRYPTION_KEY", "ADSERVE_OPENRTB__PRICE_KEYS__INTEGRITY_KEY"):
        assert deployments.count(var) == 1, f"{var}: the gateway, and only it"
    assert deployments.count("name: exchange-price-keys") == 2
    assert "price_keys" not in configs(manifests)["gateway"], "keys never go into the ConfigMap"


def test_without_static_keys_dynamodb_uses_the_default_chain_through_irsa() -> None:
    role = "arn:aws:iam::123456789012:role/adserve-features"
    manifests = render({"serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": role}}})
    dynamodb = tomllib.loads(configs(manifests)["feature-service"])["dynamodb"]
    assert dynamodb["credentials"] == "default_chain"
    assert dynamodb["access_key_id"] == "" and dynamodb["secret_access_key"] == ""
    account = manifests["adserve/templates/serviceaccount.yaml"]
    assert "kind: ServiceAccount" in account and "name: adserve\n" in account and role in account
    deployments = manifests["adserve/templates/deployment.yaml"]
    assert deployments.count("serviceAccountName: adserve\n") == len(SERVICES)
    # With static keys from a Secret, the keys are used.
    static = tomllib.loads(configs(render(SECRETS))["feature-service"])["dynamodb"]
    assert static["credentials"] == "static" and "access_key_id" not in static


PRODUCTION = {
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "prometheusRule": {"enabled": True},
    "dashboards": {"enabled": True},
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/adserve"}},
    "services": {
        svc: {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12}}
        for svc in ("gateway", "feature-service", "ranker", "auction")
    },
}


def manifest_documents(manifests: dict[str, str]) -> list[dict]:
    import yaml

    return [d for text in manifests.values() for d in yaml.safe_load_all(text) if d]


@pytest.mark.parametrize("case", [*CASES, "production"])
def test_every_rendered_manifest_validates_against_the_kubernetes_api_schemas(case: str) -> None:
    import kubernetes_validate

    values = PRODUCTION if case == "production" else CASES[case]
    documents = manifest_documents(render(values))
    kinds = {d["kind"] for d in documents}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount"} <= kinds, kinds
    for d in documents:
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: not in the Kubernetes API schemas
        # strict: unknown fields are errors too.
        kubernetes_validate.validate(d, "1.33.0", strict=True)


def test_production_values_add_autoscalers_disruption_budgets_and_a_service_monitor() -> None:
    documents = manifest_documents(render(PRODUCTION))
    by_kind: dict[str, list[dict]] = {}
    for d in documents:
        by_kind.setdefault(d["kind"], []).append(d)
    hpas = {d["metadata"]["name"]: d["spec"] for d in by_kind["HorizontalPodAutoscaler"]}
    assert sorted(hpas) == ["adserve-auction", "adserve-feature-service", "adserve-gateway", "adserve-ranker"]
    assert all(h["minReplicas"] == 3 and h["maxReplicas"] == 12 for h in hpas.values())
    # The HPA owns the replica count of what it scales; the joiner keeps its own.
    replicas = {d["metadata"]["name"]: d["spec"].get("replicas") for d in by_kind["Deployment"]}
    assert all(replicas[name] is None for name in hpas), replicas
    assert replicas["adserve-label-joiner"] == 1
    # A disruption budget for every service with more than one pod; none for the single joiner.
    pdbs = sorted(d["metadata"]["name"] for d in by_kind["PodDisruptionBudget"])
    assert pdbs == sorted(hpas), pdbs
    monitor = by_kind["ServiceMonitor"][0]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    # The defaults: fixed replicas, budgets for the 2-replica services, no monitor.
    defaults = manifest_documents(render(None))
    assert not [d for d in defaults if d["kind"] in ("HorizontalPodAutoscaler", "ServiceMonitor")]
    assert len([d for d in defaults if d["kind"] == "PodDisruptionBudget"]) == 4


def test_the_label_joiner_refuses_cpu_autoscaling() -> None:
    with pytest.raises(Exception, match="scales by Kafka partition"):
        render({"services": {"label-joiner": {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 2}}}})


def test_publisher_api_keys_reach_the_gateway_as_hashes() -> None:
    digest = "a" * 64
    keys = {"apiKeys": [{"publisher": "news-site", "sha256": digest, "requestsPerSecond": 500, "burst": 1000}]}
    gateway = tomllib.loads(configs(render({"services": {"gateway": {"config": keys}}}))["gateway"])
    assert gateway["auth"]["api_keys"] == [
        {"publisher": "news-site", "sha256": digest, "requests_per_second": 500, "burst": 1000}
    ]
    assert "auth" not in tomllib.loads(configs(render(None))["gateway"])


def test_alert_rules_and_the_dashboard_render_and_use_documented_metrics() -> None:
    import json
    import re

    manifests = render({"prometheusRule": {"enabled": True}, "dashboards": {"enabled": True}})
    documents = manifest_documents({"o": manifests["adserve/templates/observability.yaml"]})
    rule = next(d for d in documents if d["kind"] == "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {
        "AdserveAvailability",
        "AdserveLatencyP99",
        "AdserveFeatureFreshness",
        "AdserveRealtimeFeaturesStale",
        "AdserveJoinerLag",
        "AdserveCalibrationDrift",
        "AdserveCatalogIndexStale",
        "AdserveRankerRegistryStale",
        "AdserveModelRefused",
        "AdserveRankerProviderFallback",
    } <= set(alerts)
    assert "> 1.1" in alerts["AdserveCalibrationDrift"]["expr"] and "< 0.9" in alerts["AdserveCalibrationDrift"]["expr"]
    assert "> 0.025" in alerts["AdserveLatencyP99"]["expr"]
    assert alerts["AdserveRankerRegistryStale"]["expr"].endswith("> 120")
    dashboard_map = next(d for d in documents if d["kind"] == "ConfigMap")
    assert dashboard_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(dashboard_map["data"]["adserve.json"])
    assert dashboard["uid"] == "adserve-overview" and len(dashboard["panels"]) >= 6
    # Every metric they use is one the services export (docs/operations.md lists them).
    documented = set(re.findall(r"`(adserve_[a-z_]+)`", (REPO / "docs" / "operations.md").read_text()))
    used = set(re.findall(r"adserve_[a-z_]+", json.dumps([alerts, dashboard])))
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    assert used <= documented, sorted(used - documented)
    # Off by default.
    assert "observability.yaml" not in "".join(k for k, v in render(None).items() if v.strip())


def test_tls_puts_every_grpc_port_and_the_gateways_upstreams_on_mutual_tls() -> None:
    manifests = render(TLS)
    rendered = configs(manifests)
    for svc, text in rendered.items():
        server = tomllib.loads(text)["server"]
        assert server["tls"] == {
            "cert": f"{TLS_DIR}/tls.crt",
            "key": f"{TLS_DIR}/tls.key",
            "client_ca": f"{TLS_DIR}/ca.crt",
        }, svc
    up = tomllib.loads(rendered["gateway"])["upstreams"]
    assert up["ranker"] == "https://adserve-ranker:50053" and up["auction"].startswith("https://"), up
    assert up["tls"] == {"ca": f"{TLS_DIR}/ca.crt", "cert": f"{TLS_DIR}/tls.crt", "key": f"{TLS_DIR}/tls.key"}
    for d in manifest_documents(manifests):
        if d["kind"] != "Deployment":
            continue
        pod = d["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert {"name": "tls", "mountPath": TLS_DIR, "readOnly": True} in c["volumeMounts"], d["metadata"]["name"]
        assert {"name": "tls", "secret": {"secretName": "adserve-internal-tls"}} in pod["volumes"]
        # A kubelet gRPC probe cannot speak TLS: HTTP on the metrics port.
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert "grpc" not in c[probe] and "httpGet" in c[probe], (d["metadata"]["name"], probe)
            if d["metadata"]["name"] != "adserve-gateway":
                assert c[probe]["httpGet"]["port"] == "metrics"
    # One-way TLS: no client certificates asked or presented.
    one_way = configs(render({"tls": {**TLS["tls"], "mutual": False}}))
    assert "client_ca" not in tomllib.loads(one_way["ranker"])["server"]["tls"]
    assert set(tomllib.loads(one_way["gateway"])["upstreams"]["tls"]) == {"ca"}
    # Off by default: plaintext, gRPC probes.
    plain = configs(render(None))
    assert "tls" not in tomllib.loads(plain["ranker"])["server"]
    assert tomllib.loads(plain["gateway"])["upstreams"]["ranker"].startswith("http://")


def alerts(values: dict) -> dict[str, dict]:
    """The PrometheusRule's alerts, by name."""
    documents = manifest_documents({"o": render(values)["adserve/templates/observability.yaml"]})
    rule = next(d for d in documents if d["kind"] == "PrometheusRule")
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def test_the_registry_staleness_alert_never_fires_between_two_polls() -> None:
    # A poll interval of 5 minutes: a 120 s threshold would page on a healthy
    # ranker between polls; the rule uses three polls instead.
    values = {
        "prometheusRule": {"enabled": True},
        "services": {"ranker": {"config": {"registry": {"pollIntervalMs": 300000}}}},
    }
    assert alerts(values)["AdserveRankerRegistryStale"]["expr"].endswith("> 900")


def test_a_model_load_stuck_past_its_time_limit_alerts_after_the_limit_and_a_margin() -> None:
    values = {
        "prometheusRule": {"enabled": True},
        "services": {"ranker": {"config": {"registry": {"loadTimeoutSeconds": 3600}}}},
    }
    hung = alerts(values)["AdserveRankerModelLoadHung"]
    assert hung["expr"] == "max by (instance, role, model_version) (adserve_ranker_model_loading) > 0"
    # A load may take load_timeout; only a thread still running well past it
    # (the version was refused as `timeout` meanwhile) is stuck.
    assert hung["for"] == "4200s"


def test_the_ranker_may_have_its_own_startup_window_and_the_rest_keep_the_charts() -> None:
    values = {"services": {"ranker": {"probes": {"startup": {"failureThreshold": 900}}}}}
    documents = manifest_documents({"d": render(values)["adserve/templates/deployment.yaml"]})
    startup = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
        for d in documents
        if d["kind"] == "Deployment"
    }
    assert startup["adserve-ranker"]["failureThreshold"] == 900
    # The keys it does not set are the chart's.
    assert startup["adserve-ranker"]["periodSeconds"] == 2 and startup["adserve-ranker"]["timeoutSeconds"] == 2
    assert startup["adserve-ranker"]["grpc"]["port"] == 50053
    others = [name for name in startup if name != "adserve-ranker"]
    assert others and all(startup[name]["failureThreshold"] == 60 for name in others)


def ranker_pod(values: dict) -> dict:
    documents = manifest_documents({"d": render(values)["adserve/templates/deployment.yaml"]})
    deployment = next(d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "adserve-ranker")
    return deployment["spec"]["template"]["spec"]


def test_the_tensorrt_engine_cache_is_on_a_volume_not_the_read_only_root() -> None:
    pod = ranker_pod(GPU)
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/var/cache/adserve/trt"] == "trt-engine-cache"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["trt-engine-cache"]["emptyDir"] == {}
    # A claim shares built engines between pods.
    shared = copy.deepcopy(GPU)
    shared["services"]["ranker"]["gpu"]["engineCache"] = {"claimName": "trt-engines"}
    volumes = {v["name"]: v for v in ranker_pod(shared)["volumes"]}
    assert volumes["trt-engine-cache"]["persistentVolumeClaim"] == {"claimName": "trt-engines"}
    # A mount of that path of the user's own takes its place (no second mount).
    own = copy.deepcopy(GPU)
    own["services"]["ranker"]["extraVolumes"] = [{"name": "mine", "emptyDir": {}}]
    own["services"]["ranker"]["extraVolumeMounts"] = [{"name": "mine", "mountPath": "/var/cache/adserve/trt/"}]
    pod = ranker_pod(own)
    assert [m["name"] for m in pod["containers"][0]["volumeMounts"] if m["mountPath"].startswith("/var/cache")] == ["mine"]
    assert "trt-engine-cache" not in {v["name"] for v in pod["volumes"]}
    # No cache dir, no volume.
    assert "trt-engine-cache" not in {v["name"] for v in ranker_pod({})["volumes"]}


def test_a_relative_engine_cache_dir_is_refused_by_name() -> None:
    values = {"services": {"ranker": {"config": {"model": {"tensorrt": {"engineCacheDir": "trt"}}}}}}
    with pytest.raises(Exception, match="engineCacheDir must be an absolute path"):
        render(values)


def startup_probes(values: dict) -> dict[str, dict]:
    documents = manifest_documents({"d": render(values)["adserve/templates/deployment.yaml"]})
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
        for d in documents
        if d["kind"] == "Deployment"
    }


def test_the_rankers_startup_window_covers_its_bounded_registry_load() -> None:
    # The start waits up to loadTimeoutSeconds for the registry's model, then
    # loads model.dir: a shorter window would restart the pod first.
    assert startup_probes({})["adserve-ranker"]["failureThreshold"] == (600 + 120) // 2
    longer = {"services": {"ranker": {"config": {"registry": {"loadTimeoutSeconds": 1500}}}}}
    assert startup_probes(longer)["adserve-ranker"]["failureThreshold"] == (1500 + 120) // 2
    # Rounded up to a whole period.
    slow = {"probes": {"startup": {"periodSeconds": 7}}}
    assert startup_probes(slow)["adserve-ranker"]["failureThreshold"] == -(-(600 + 120) // 7)
    # A wider window of the ranker's own stays; without the registry the
    # chart's stands.
    wide = {"services": {"ranker": {"probes": {"startup": {"failureThreshold": 5000}}}}}
    assert startup_probes(wide)["adserve-ranker"]["failureThreshold"] == 5000
    off = {"services": {"ranker": {"config": {"registry": {"enabled": False}}}}}
    assert startup_probes(off)["adserve-ranker"]["failureThreshold"] == 60
    # The rest keep the chart's.
    assert all(p["failureThreshold"] == 60 for name, p in startup_probes({}).items() if name != "adserve-ranker")
    # A GPU node's model.dir builds its own engine after a given-up registry load.
    gpu = {"services": {"ranker": {"modelDirLoadSeconds": 600, "config": {"registry": {"loadTimeoutSeconds": 1500}}}}}
    assert startup_probes(gpu)["adserve-ranker"]["failureThreshold"] == (1500 + 600) // 2
    # A start within its window is not a failed rollout.
    documents = manifest_documents({"d": render(gpu)["adserve/templates/deployment.yaml"]})
    deadlines = {d["metadata"]["name"]: d["spec"].get("progressDeadlineSeconds") for d in documents if d["kind"] == "Deployment"}
    assert deadlines["adserve-ranker"] == 2100 + 60
    assert deadlines["adserve-gateway"] is None
