"""cluster/ configs checked against what their operators need (``tests/test_cluster_head.py``: `ray job submit` against a real head).

The YAML checks go past "it parses": the cluster launcher file passes Ray's own
validation, the KubeRay files have the fields KubeRay and the GPU scheduler act on, every
pod that joins or talks to a cluster gets the Ray token from a Secret, no file carries a
credential, and every ``python -m jobs.X …`` command in them parses with that job's own
flags.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from jobs.common.errors import JobError

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
VENV_BIN = Path(sys.executable).parent


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _docs(kind: str) -> list[dict]:
    return [d for p in sorted(CLUSTER.rglob("*.yaml")) for d in _load(p) if d.get("kind") == kind]


def test_every_yaml_file_is_known():
    kinds = {}
    for p in sorted(CLUSTER.rglob("*.yaml")):
        for d in _load(p):
            key = d.get("kind") or ("cluster-launcher" if "available_node_types" in d else "runtime-env" if "working_dir" in d else None)
            assert key, f"{p}: neither a Kubernetes object, a cluster launcher config nor a runtime env"
            kinds.setdefault(key, []).append(p.name)
    assert {"RayJob", "RayCluster", "CronJob", "cluster-launcher", "runtime-env"} <= set(kinds)


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


TOKEN_KEY = "auth_token"  # the key KubeRay reads a token Secret by (RAY_AUTH_TOKEN_SECRET_KEY)


def _assert_token_from_secret(container: dict, where: str, secret: str):
    """A container that talks to a cluster (a submitter): the token from the cluster's Secret, by KubeRay's key."""
    env = {e["name"]: e for e in container.get("env", [])}
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE=token missing"
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    assert ref == {"name": secret, "key": TOKEN_KEY}, f"{where}: RAY_AUTH_TOKEN must come from Secret {secret}, key {TOKEN_KEY}"


def _token_secret(spec: dict, name: str) -> str:
    """KubeRay's own token auth (>= 1.6; secretName >= 1.7): the operator sets the variables in every
    Ray container, the autoscaler's included, and uses the token for its own calls to the head."""
    auth = spec.get("authOptions") or {}
    assert auth.get("mode") == "token" and auth.get("secretName"), f"{name}: authOptions.mode token with a secretName"
    return auth["secretName"]


def _ray_cluster_spec_checks(spec: dict, name: str, autoscaling: bool):
    _token_secret(spec, name)
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{name}: the head (job API) must not be exposed outside the cluster"
    groups = [("head", head["template"])] + [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    for group, pod in groups:
        for c in _containers(pod):
            names = {e["name"] for e in c.get("env", [])}
            # Set by hand, they would shadow the operator's (it skips variables that exist).
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, f"{name}/{group}: leave the token variables to authOptions"
            requests = c.get("resources", {}).get("requests", {})
            cpu = requests.get("cpu")
            if cpu is not None and not str(cpu).endswith("m"):
                # A 16-vCPU node's allocatable is under 16 (kubelet reserve, daemonsets).
                assert float(cpu) <= 14, f"{name}/{group}: cpu {cpu} does not fit a 16-vCPU node's allocatable"
    gpu_groups = []
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and "rayStartParams" in g
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{name}/{g['groupName']}: replica bounds"
        pod = g["template"]
        for c in _containers(pod):
            limits = c.get("resources", {}).get("limits", {})
            if "nvidia.com/gpu" in limits:
                assert int(limits["nvidia.com/gpu"]) >= 1
                assert c["resources"]["requests"].get("nvidia.com/gpu") == limits["nvidia.com/gpu"], "GPU requests == limits"
                tol = pod["spec"].get("tolerations", [])
                assert any(t.get("key") == "nvidia.com/gpu" for t in tol), f"{name}/{g['groupName']}: GPU nodes are tainted; tolerate it"
                gpu_groups.append(g)
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/dev/shm" in mounts, f"{name}/{g['groupName']}: Ray's object store needs a real /dev/shm"
    assert gpu_groups, f"{name}: no GPU worker group"
    if autoscaling:
        assert spec.get("enableInTreeAutoscaling") is True
        assert any(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups), f"{name}: GPU workers do not scale"


def test_rayjob_for_training():
    (job,) = _docs("RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m jobs.train") and "--gpu" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    secret = _token_secret(spec["rayClusterSpec"], "RayJob")
    if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
        for c in _containers(spec["submitterPodTemplate"]):
            _assert_token_from_secret(c, "RayJob submitter", secret)
    _ray_cluster_spec_checks(spec["rayClusterSpec"], "RayJob", autoscaling=False)


def test_raycluster_for_scans_autoscales_gpus():
    (rc,) = _docs("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    _ray_cluster_spec_checks(rc["spec"], "RayCluster", autoscaling=True)
    (head,) = _containers(rc["spec"]["headGroupSpec"]["template"])
    env = {e["name"]: e for e in head.get("env", [])}
    # The scan's driver commits the tables from the head: its catalog's URI (with a password) from a Secret.
    assert env["PYICEBERG_CATALOG__DETECTOR__URI"]["valueFrom"]["secretKeyRef"]["name"]


def test_nightly_cronjob_submits_each_night_once_and_stops_it_at_the_deadline():
    (cj,) = _docs("CronJob")
    (rc,) = _docs("RayCluster")
    assert cj["apiVersion"] == "batch/v1"
    spec = cj["spec"]
    fields = spec["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(r"[\d*/,-]+", f) for f in fields)
    assert spec["concurrencyPolicy"] == "Forbid"  # two nights must not scan at once
    (c,) = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    _assert_token_from_secret(c, "CronJob", _token_secret(rc["spec"], "RayCluster"))
    script = " ".join(c.get("command", []) + c.get("args", []))
    assert "ray job submit" not in script  # a bare submit: a new job per retry, and it outlives the pod
    steps = re.findall(r'python -m jobs\.submit --submission-id "(\w+)-\$\{DAY\}" --deadline (\d+)', script)
    assert [name for name, _ in steps] == ["scan", "report", "maintain"], steps
    # jobs.submit must reach each deadline (and stop the Ray job) before Kubernetes ends the pod.
    assert sum(int(d) for _, d in steps) < spec["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert '--scan-date "$DAY"' in script and "date -u +%F" in script and "--chunk-size 1000000" in script
    env = {e["name"]: e.get("value", "") for e in c["env"]}
    assert env["RAY_ADDRESS"].startswith("http://") and env["RAY_ADDRESS"].endswith(":8265")


def test_cluster_launcher_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())
    validate_config(prepare_config(dict(raw)))
    types = raw["available_node_types"]
    assert raw["head_node_type"] in types and types[raw["head_node_type"]]["resources"].get("CPU") == 0
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].split(".")[0][0] in "gp"]
    assert gpu and all(t["max_workers"] > t["min_workers"] == 0 for t in gpu)
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in gpu)
    # setup_commands run in the image, which has boto3 and no aws CLI; a private image needs a
    # registry login on the host first.
    assert not any(re.search(r"(^|[;&|]\s*)aws ", cmd) for cmd in raw["setup_commands"])
    assert any("docker login" in cmd for cmd in raw["initialization_commands"])
    head_cmds = " ".join(raw["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_cmds and "--dashboard-host=127.0.0.1" in head_cmds
    assert "RAY_AUTH_MODE=token" in " ".join(raw["worker_start_ray_commands"])


def test_runtime_env_is_one_ray_accepts():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "." and ".venv/" in env["excludes"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"} & set(env.get("env_vars", {}))


def test_no_credentials_in_cluster_files():
    for p in sorted(CLUSTER.rglob("*")):
        if p.is_file():
            text = p.read_text()
            assert not re.search(r"AKIA[0-9A-Z]{16}", text), p
            # A literal value; a shell variable ("$PW", from `openssl rand`) is how the README makes secrets.
            assert not re.search(r"(?i)(secret_access_key|session_token|password)\s*[:=]\s*(?![\"']?\$)\S", text), p
            for doc in _load(p) if p.suffix == ".yaml" else []:
                for m in re.finditer(r"name: (RAY_AUTH_TOKEN|AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID)\n\s*value:", yaml.safe_dump(doc)):
                    raise AssertionError(f"{p}: {m.group(1)} has a literal value")


def _split_commands(module: str, args: list[str]) -> list[list[str]]:
    """``jobs.submit … -- python -m jobs.scan …`` is two commands, each parsed by its own job."""
    out = []
    while "--" in args:
        cut = args.index("--")
        out.append([module, *args[:cut]])
        inner = args[cut + 1:]
        if inner[:2] != ["python", "-m"]:
            return out
        module, args = inner[2], inner[3:]
    return [*out, [module, *args]]


def _job_commands() -> list[list[str]]:
    """Every `python -m jobs.X …` command line written in cluster/ (its README included) and the README."""
    texts = [p.read_text() for p in sorted(CLUSTER.rglob("*.yaml"))] + [(ROOT / "README.md").read_text(), (CLUSTER / "README.md").read_text()]
    texts += [d["spec"]["entrypoint"] for d in _docs("RayJob")]  # a folded YAML string: one line once parsed
    cmds = []
    for text in texts:
        flat = re.sub(r"\\\n\s*", " ", text)
        flat = re.sub(r"\[[^\]\n]*\]", " ", flat)  # usage lines: [--optional …] groups
        for m in re.finditer(r"python -m (jobs\.\w+)((?:[ \t]+(?:\"[^\"]*\"|'[^']*'|[^\s|&;#`]+))*)", flat):
            cmds += _split_commands(m.group(1), shlex.split(m.group(2)))
    return cmds


def test_every_job_command_in_the_configs_and_readme_parses():
    from jobs.common.flags import parse_config

    cmds = _job_commands()
    assert len(cmds) > 10
    for module, *args in cmds:
        mod = importlib.import_module(module)
        found = [v for v in vars(mod).values() if dataclasses.is_dataclass(v) and v.__module__.startswith("jobs.") and v.__name__.endswith("Config")]
        # The job's own config, or the one it parses from shared wiring (jobs.embed: jobs.training.embedding's EmbedConfig).
        configs = [v for v in found if v.__module__ == module] or found
        args = [a for a in args if a not in ("…", "...")]
        if module == "jobs.audit":  # three verbs, a config each
            if args[:1] == ["migrate"]:
                configs, args = [mod.MigrateConfig], args[1:]
            elif args[:2] == ["verdicts", "import"]:
                configs, args = [mod.VerdictsConfig], ["--file", args[2], *args[3:]]
            else:
                configs, args = [mod.AuditConfig], ["--question", args[1], *args[2:]]
        if module == "jobs.maintain" and args[:1] in (["check"], ["repair"]):  # verbs of one config
            args = args[1:]
        assert len(configs) == 1, module
        args = [re.sub(r"\$\{?\w+\}?", "X", a) for a in args]  # shell variables
        try:
            parse_config(configs[0], args)
        except (SystemExit, JobError):
            pytest.fail(f"`python -m {module} {' '.join(args)}` does not parse")


SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay-v1.7.0"


def _closed(schema):
    """The CRD schema with unknown fields rejected, as `kubectl apply` does (server-side field validation)."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def _k8s_objects() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(CLUSTER.rglob("*.yaml")) for d in _load(p) if "apiVersion" in d]


def test_manifests_validate_against_kuberay_and_kubernetes_schemas():
    """Every Kubernetes object in cluster/: KubeRay's v1.7.0 CRDs, or Kubernetes' own schemas (strict: unknown fields fail)."""
    import jsonschema
    import kubernetes_validate

    if not SCHEMAS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS} (a clone outside this workspace)")
    crds = {}
    for name in ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"):
        crd = yaml.safe_load((SCHEMAS / name).read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        crds[crd["spec"]["names"]["kind"]] = _closed(version["schema"]["openAPIV3Schema"])
    checked = set()
    for fname, doc in _k8s_objects():
        kind = doc["kind"]
        if kind in crds:
            errors = sorted(jsonschema.Draft7Validator(crds[kind]).iter_errors(doc), key=lambda e: list(e.path))
            assert not errors, f"{fname} {kind}: " + "; ".join(f"{'/'.join(map(str, e.path))}: {e.message[:200]}" for e in errors[:5])
        else:
            for version in ("1.27", "1.37"):  # the oldest and newest Kubernetes the files are meant for
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    pytest.fail(f"{fname} {kind} on Kubernetes {version}: {e.message[:300]} at {'/'.join(map(str, e.path))}")
        checked.add(kind)
    assert {"RayCluster", "RayJob", "CronJob", "ServiceAccount", "StatefulSet", "Service"} <= checked


def _refs(obj, out: dict[str, set[str]]) -> None:
    """The ServiceAccounts, Secrets and ConfigMaps an object refers to, anywhere in it."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "serviceAccountName":
                out["ServiceAccount"].add(v)
            elif k in ("secretKeyRef", "secretRef") and isinstance(v, dict):
                out["Secret"].add(v["name"])
            elif k in ("configMapKeyRef", "configMapRef") and isinstance(v, dict):
                out["ConfigMap"].add(v["name"])
            elif k == "secret" and isinstance(v, dict) and "secretName" in v:
                out["Secret"].add(v["secretName"])
            elif k == "configMap" and isinstance(v, dict) and "name" in v:
                out["ConfigMap"].add(v["name"])
            elif k == "authOptions" and isinstance(v, dict) and v.get("secretName"):
                out["Secret"].add(v["secretName"])
            _refs(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _refs(v, out)


def test_every_referenced_service_account_secret_and_config_map_is_created():
    """Made by a file in cluster/ or by a `kubectl create secret|configmap|serviceaccount` step of cluster/README.md."""
    referenced: dict[str, set[str]] = {"ServiceAccount": set(), "Secret": set(), "ConfigMap": set()}
    created: dict[str, set[str]] = {k: set() for k in referenced}
    for _, doc in _k8s_objects():
        _refs(doc, referenced)
        if doc["kind"] in created:
            created[doc["kind"]].add(doc["metadata"]["name"])
    steps = (CLUSTER / "README.md").read_text()
    for kind, verb in (("Secret", r"secret generic"), ("ConfigMap", r"configmap"), ("ServiceAccount", r"serviceaccount")):
        created[kind] |= set(re.findall(rf"kubectl create {verb} ([\w.-]+)", steps))
    for kind in referenced:
        missing = referenced[kind] - created[kind]
        assert not missing, f"{kind} {sorted(missing)} referenced in cluster/ but created by no file or README step"
    assert referenced["Secret"] >= {"ray-auth-token", "detector-catalog"} and referenced["ServiceAccount"] == {"diffusion-detector"}
    # The token Secret's key is the one KubeRay reads; the README's step must create that key.
    assert re.search(r"kubectl create secret generic ray-auth-token --from-literal=auth_token=", steps)


def test_iam_policy_grants_what_the_launcher_config_uses():

    policy = json.loads((CLUSTER / "aws" / "iam-policy.json").read_text())
    raw = yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())
    grants = {}
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow" and st["Sid"]
        res = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        for a in st["Action"]:
            grants.setdefault(a, []).extend(res)

    def allowed(action: str, resource: str) -> bool:
        return any(re.fullmatch(re.escape(r).replace("\\*", ".*"), resource) for r in grants.get(action, []))

    (secret_id,) = set(re.findall(r"SecretId='([^']+)'", " ".join(raw["setup_commands"])))
    region = raw["provider"]["region"]
    assert allowed("secretsmanager:GetSecretValue", f"arn:aws:secretsmanager:{region}:123456789012:secret:{secret_id}-AbCdEf")
    assert allowed("ecr:GetAuthorizationToken", "*") and allowed("ecr:BatchGetImage", "*")
    for action in ("ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeInstances", "ec2:CreateTags"):
        assert allowed(action, "*"), action
    profiles = {t["node_config"]["IamInstanceProfile"]["Arn"] for t in raw["available_node_types"].values()}
    assert all(allowed("iam:PassRole", p.replace(":instance-profile/", ":role/")) for p in profiles)
    cron = " ".join(c for _, d in _k8s_objects() if d["kind"] == "CronJob"
                    for c in d["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"])
    env = {e["name"]: e.get("value", "") for _, d in _k8s_objects() if d["kind"] == "CronJob"
           for e in d["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "$OUTPUT" in cron
    out_bucket = env["OUTPUT"][5:].split("/")[0]
    for action in ("s3:PutObject", "s3:DeleteObject", "s3:GetObject"):  # the scan writes, and removes its plan, intents, lease
        assert allowed(action, f"arn:aws:s3:::{out_bucket}/scans/x"), action
    assert allowed("s3:ListBucket", f"arn:aws:s3:::{out_bucket}")
    in_bucket = env["INPUT"][5:].split("/")[0]
    assert allowed("s3:GetObject", f"arn:aws:s3:::{in_bucket}/a/manifest.json") and not allowed("s3:PutObject", f"arn:aws:s3:::{in_bucket}/x")


def test_dockerfile_pins_a_torch_built_for_the_images_cuda():
    text = (CLUSTER / "Dockerfile").read_text()
    (cuda,) = re.findall(r"^ARG CUDA=(cu\d+)$", text, flags=re.MULTILINE)
    assert re.fullmatch(r"cu1[2-9]\d", cuda)  # a CUDA 12+ image tag that PyTorch's index names the same way
    assert re.search(r"^FROM rayproject/ray:[\d.]+-py311-\$\{CUDA\}$", text, flags=re.MULTILINE)
    assert 'download.pytorch.org/whl/${CUDA}' in text
    cap = re.search(r'"torch>=[\d.]+,<=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"torch=={cap}" in text  # the build the package allows, from the CUDA index, so pip keeps it
    assert "torch.version.cuda" in text  # the build fails when torch and the image disagree


# --- ray job submit against a real head -------------------------------------------------
