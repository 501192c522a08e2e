"""cluster/ configs checked against what their operators need, and `ray job submit` against a real head.

The YAML checks go past "it parses": the cluster launcher file passes Ray's own
validation, the KubeRay files have the fields KubeRay and the GPU scheduler act on, every
pod that joins or talks to a cluster gets the Ray token from a Secret, no file carries a
credential, and every ``python -m jobs.X …`` command in them parses with that job's own
flags. The submission test (marker ``cluster``, run by ``make test``) starts a head with
``ray start --head`` (token auth on, dashboard on loopback), uploads a labelled image set to
the S3 server in tests, and with the ``ray job submit`` CLI trains a detector to s3://,
scans an s3:// prefix with it and reads the tables back from the bucket; jobs that must
fail end non-zero with one ``ERROR:`` line at the end of their logs. The head is stopped
at the end, whatever happened.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.common.errors import JobError
from jobs.common.ray_setup import LOCAL_RAY_ENV, LOCAL_RAY_SYSTEM_CONFIG

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
    import json

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

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(s3_server, tmp_path_factory):
    """A Ray head from `ray start --head --block` with token auth on; stopped (process tree killed) at the end.

    It keeps idle workers and lists Parquet with one footer reader, as a private Ray does
    (``LOCAL_RAY_SYSTEM_CONFIG``, ``LOCAL_RAY_ENV``): on 2 cores each job's stages would otherwise
    re-import torch and pyarrow in fresh workers.
    """
    import psutil

    token = uuid.uuid4().hex
    dash, gcs = _free_port(), _free_port()
    temp = Path(f"/tmp/rh-{uuid.uuid4().hex[:8]}")  # short: Ray's socket paths have a length limit
    env = {**LOCAL_RAY_ENV, **os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("head") / "head.log", "wb")
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--ray-client-server-port={_free_port()}", "--num-cpus=4", f"--temp-dir={temp}",
         # Every fixed default port elsewhere too: the session's local Ray already holds them.
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
         f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
         "--include-dashboard=true", "--disable-usage-stats", f"--system-config={json.dumps(LOCAL_RAY_SYSTEM_CONFIG)}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray head did not come up; see {log.name}")
            time.sleep(2)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "env": env, "token": token}
    finally:
        try:
            tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=8)
        for p in alive:
            p.kill()
        log.close()
        subprocess.run(["rm", "-rf", str(temp)])


def _submit(head, runtime_env: Path, *cmd: str, wait: bool = True, sid: str | None = None) -> subprocess.CompletedProcess | str:
    sid = sid or f"t-{uuid.uuid4().hex[:8]}"
    args = [str(VENV_BIN / "ray"), "job", "submit", "--address", head["address"], "--submission-id", sid,
            "--runtime-env", str(runtime_env), *([] if wait else ["--no-wait"]), "--", *cmd]
    deadline = time.time() + 120
    while True:
        res = subprocess.run(args, env=head["env"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        # The job API answers before the head's job agent is up; Ray says to try again.
        if "No available agent to submit job" not in res.stdout + res.stderr or time.time() > deadline:
            break
        time.sleep(2)
    if not wait:
        assert res.returncode == 0, res.stdout + res.stderr
        return sid
    return res


def _wait(head, sid: str, timeout: float = 300) -> tuple[str, str]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head["address"], headers={"Authorization": f"Bearer {head['token']}"})
    deadline = time.time() + timeout
    while (status := str(client.get_job_status(sid))) not in ("JobStatus.SUCCEEDED", "JobStatus.FAILED", "JobStatus.STOPPED", "SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, f"job {sid} still {status}"
        time.sleep(1)
    return status.rsplit(".", 1)[-1], client.get_job_logs(sid)


def _last_line(logs: str) -> str:
    return [ln for ln in logs.splitlines() if ln.strip()][-1]


def _runtime_env(tmp_path: Path, endpoint: str, **extra_env) -> Path:
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    env["env_vars"] = {**env.get("env_vars", {}), "AWS_ENDPOINT_URL": endpoint, **extra_env}
    path = tmp_path / f"runtime_env_{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(env))
    return path


@pytest.mark.cluster
def test_job_api_refuses_requests_without_the_token(ray_head):
    env = {k: v for k, v in ray_head["env"].items() if k not in ("RAY_AUTH_TOKEN",)}
    res = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", ray_head["address"]], env=env, capture_output=True, text=True)
    assert res.returncode != 0
    wrong = {**env, "RAY_AUTH_TOKEN": "not-the-token"}
    assert subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", ray_head["address"]], env=wrong, capture_output=True).returncode != 0


@pytest.mark.cluster
def test_train_then_scan_through_ray_job_submit_on_s3(ray_head, s3_server, s3_bucket, tmp_path):
    import s3fs

    from detector_core.demo import encode, make_dataset, make_image

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    b = s3_bucket[5:]
    rows = []
    for d in make_dataset(40, 40, seed=4):
        key = f"{b}/data/{d.name}.png"
        fs.pipe(key, encode(d.image))
        rows.append({"uri": f"s3://{key}", "label": d.label, "generator": d.generator})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    fs.pipe(f"{b}/data/manifest.parquet", buf.getvalue())
    rng = np.random.default_rng(9)
    for i in range(8):
        fs.pipe(f"{b}/incoming/img_{i}.png", encode(make_image(rng)))
    fs.pipe(f"{b}/incoming/broken.jpg", b"<html>not an image</html>")
    renv = _runtime_env(tmp_path, s3_server)

    train = _submit(ray_head, renv, "python", "-m", "jobs.train", "--manifest", f"{s3_bucket}/data/manifest.parquet",
                    "--output", f"{s3_bucket}/train", "--epochs", "3", "--batch-size", "32", "--embed-batch-size", "64",
                    "--clip-model", "test-tiny", "--pretrained", "none")
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    fs.invalidate_cache()
    assert fs.exists(f"{b}/train/detector/detector.json") and fs.exists(f"{b}/train/metrics.json")

    # Failures, submitted together while the scan runs: each ends FAILED with one ERROR: line last.
    # The head runs on this machine, so a SQLite catalog file here is one it can reach.
    catalog = ["--catalog", f"sqlite:///{tmp_path}/catalog.db"]
    bad_input = _submit(ray_head, renv, "python", "-m", "jobs.scan", "--detector", f"{s3_bucket}/train/detector",
                        "--input", f"{s3_bucket}/no-such-prefix/", "--output", f"{s3_bucket}/scans-x", *catalog,
                        "--namespace", "x", wait=False)
    no_bundle = _submit(ray_head, renv, "python", "-m", "jobs.scan", "--detector", f"{s3_bucket}/no-such-detector",
                        "--input", f"{s3_bucket}/incoming/", "--output", f"{s3_bucket}/scans-x", *catalog, wait=False)
    scan = _submit(ray_head, renv, "python", "-m", "jobs.scan", "--detector", f"{s3_bucket}/train/detector",
                   "--input", f"{s3_bucket}/incoming/", "--output", f"{s3_bucket}/scans", *catalog)
    assert scan.returncode == 0, scan.stdout[-3000:] + scan.stderr[-3000:]

    from detector_core.tables.catalog import read_table

    scores = read_table(f"{s3_bucket}/scans", "scores")
    errors = read_table(f"{s3_bucket}/scans", "errors")
    assert scores.num_rows == 8 and errors.num_rows == 1
    assert sorted(scores["uri"].to_pylist()) == sorted(f"{s3_bucket}/incoming/img_{i}.png" for i in range(8))
    assert fs.ls(f"{b}/scans/runs")

    status, logs = _wait(ray_head, bad_input)
    assert status == "FAILED" and _last_line(logs).startswith("ERROR:") and "no-such-prefix" in _last_line(logs)
    status, logs = _wait(ray_head, no_bundle)
    assert status == "FAILED" and _last_line(logs).startswith("ERROR:") and "no-such-detector" in _last_line(logs)


@pytest.mark.cluster
def test_wrong_credentials_end_with_one_line(ray_head, tmp_path):
    """An S3 server that checks signatures (moto with auth on) refuses unknown keys."""
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)
        renv = _runtime_env(tmp_path, f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="AKIDWRONGWRONGWRONG0",
                            AWS_SECRET_ACCESS_KEY="wrong-secret")
        sid = f"t-{uuid.uuid4().hex[:8]}"
        res = _submit(ray_head, renv, "python", "-m", "jobs.scan", "--detector", "s3://models/detector",
                      "--input", "s3://uploads/", "--output", "s3://audit/scans", "--catalog", f"sqlite:///{tmp_path}/c.db", sid=sid)
        assert res.returncode != 0
        status, logs = _wait(ray_head, sid)
        last = _last_line(logs)
        assert status == "FAILED" and last.startswith("ERROR: object store refused the request"), logs[-2000:]
        assert "check the credentials" in last
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.cluster
def test_no_secret_reaches_any_file_a_local_run_leaves(ray_head, s3_server, s3_bucket, tmp_path):
    """A scan of s3:// with a marker secret, as its own driver with its own local Ray: no file it leaves holds the secret.

    Ray writes runtime envs in plain text into its session logs; credentials must reach the
    workers through their environment, never a runtime env. moto accepts any key pair, so the
    marker is the secret actually used for every S3 request. Without ``--ray-address`` the job
    starts a private local Ray and says so -- here beside a running `ray start --head` with
    token auth, whose token is in the environment: the job must not join that head (and fail
    on ``num_cpus``).
    """
    import shutil
    import tempfile

    import s3fs

    from detector_core.demo import encode, make_image

    fs = s3fs.S3FileSystem()
    rng = np.random.default_rng(0)
    for i in range(3):
        fs.pipe(f"{s3_bucket[5:]}/in/img_{i}.png", encode(make_image(rng)))
    _tiny_bundle(tmp_path / "detector")
    marker = "MARKERSECRET" + uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(AWS_SECRET_ACCESS_KEY=marker, RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=ray_head["token"])
    try:
        res = subprocess.run([sys.executable, "-m", "jobs.scan", "--detector", str(tmp_path / "detector"), "--input", f"{s3_bucket}/in",
                              "--output", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "scored 3" in res.stdout and "starting a private local Ray" in res.stderr
        leaked = []
        for root in (Path(ray_tmp), tmp_path / "out"):
            for p in root.rglob("*"):
                if p.is_file() and not p.is_symlink() and marker.encode() in p.read_bytes():
                    leaked.append(str(p))
        files = sum(1 for _ in Path(ray_tmp).rglob("*"))
        assert files > 10 and not leaked, f"the secret is in {leaked}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _tiny_bundle(path: Path) -> Path:
    import torch

    from detector_core.method.bundle import DetectorBundle, save_bundle
    from detector_core.method.extractors import FeatureSpec
    from detector_core.method.model import DetectorMLP

    torch.manual_seed(0)
    save_bundle(DetectorBundle(model=DetectorMLP(64).eval(), features=FeatureSpec(clip_model="test-tiny", feature_mode="image")), str(path))
    return path


@pytest.mark.cluster
def test_ray_connections_fail_fast_with_one_line(ray_head, tmp_path):
    """As a user on a workstation with a `ray start --head` (token auth on) running.

    A dead address, a token cluster without the token, a wrong token and the dashboard's
    address each end the job within the subprocess timeout (ray.init would wait minutes on a
    dead head) with one ``ERROR:`` line saying what to set. (No address at all: a private local
    Ray beside the head, in ``test_no_secret_reaches_any_file_a_local_run_leaves``.)
    """
    from detector_core.demo import encode, make_image

    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    for i in range(2):
        (tmp_path / "in" / f"img_{i}.png").write_bytes(encode(make_image(rng)))
    args = [sys.executable, "-m", "jobs.scan", "--detector", str(_tiny_bundle(tmp_path / "detector")), "--input", str(tmp_path / "in"),
            "--output", str(tmp_path / "out")]
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    with_token = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_head["token"]}
    cases = [
        (["--ray-address", f"127.0.0.1:{_free_port()}"], with_token, "no Ray cluster answers at"),
        (["--ray-address", ray_head["gcs"]], base, "requires a token and RAY_AUTH_MODE is not set; set RAY_AUTH_MODE=token"),
        (["--ray-address", ray_head["gcs"]], {**with_token, "RAY_AUTH_TOKEN": "not-the-token"}, "is not its token"),
        (["--ray-address", ray_head["address"]], with_token, "is a dashboard (job API) address"),
    ]
    for extra, env, says in cases:
        res = subprocess.run([*args, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
        assert res.returncode == 2, (extra, res.stderr[-2000:])
        assert _last_line(res.stderr).startswith("ERROR: ") and says in _last_line(res.stderr), res.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # nothing was written before the connection was checked


@pytest.mark.cluster
def test_nightly_submitter_submits_once_follows_and_stops_at_the_deadline(ray_head, tmp_path):
    """`python -m jobs.submit`, as the CronJob runs it, against the real head (token from the environment).

    Two submitters with the same id at once start one job and both follow it to its end; a
    job past its deadline is stopped (the Ray job, not only the submitter); SIGTERM to the
    submitter (Kubernetes' activeDeadlineSeconds) stops the Ray job too.
    """
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head["address"], headers={"Authorization": f"Bearer {ray_head['token']}"})
    env = {**{k: v for k, v in ray_head["env"].items() if k != "RAY_ADDRESS"}, "RAY_ADDRESS": ray_head["address"]}
    base = [sys.executable, "-m", "jobs.submit"]

    def start(sid: str, *cmd: str, deadline: float = 300) -> subprocess.Popen:
        return subprocess.Popen([*base, "--submission-id", sid, "--deadline", str(deadline), "--", *cmd], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    once = f"once-{uuid.uuid4().hex[:6]}"
    marker = tmp_path / "runs"
    cmd = ["python", "-c", f"import time; open({str(marker)!r}, 'a').write('ran\\n'); time.sleep(3); print('night done')"]
    a, b = start(once, *cmd), start(once, *cmd)
    outs = [p.communicate(timeout=300) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    assert marker.read_text() == "ran\n"  # the entrypoint ran once
    assert [j.submission_id for j in client.list_jobs()].count(once) == 1
    assert all("night done" in out for out, _ in outs)  # both followed the one job's log
    again = subprocess.run([*base, "--submission-id", once, "--", *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "exists (SUCCEEDED)" in again.stdout and marker.read_text() == "ran\n"  # not rerun

    late = f"late-{uuid.uuid4().hex[:6]}"
    p = start(late, "python", "-c", "import time; time.sleep(600)", deadline=8)
    _, err = p.communicate(timeout=180)
    assert p.returncode == 1 and _last_line(err) == f"ERROR: job {late} ran past its deadline of 8 s and was stopped"
    assert str(client.get_job_status(late)).endswith("STOPPED")

    term = f"term-{uuid.uuid4().hex[:6]}"
    p = start(term, "python", "-c", "import time; time.sleep(600)")
    deadline = time.time() + 120
    while not str(client.get_job_status(term) if term in [j.submission_id for j in client.list_jobs()] else "").endswith("RUNNING"):
        assert time.time() < deadline, "the job never started"
        time.sleep(1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "the submitter was terminated" in _last_line(err)
    assert str(client.get_job_status(term)).endswith("STOPPED")
