"""cluster/: the manifests, launcher YAML and image definition parse and carry what Ray and KubeRay need, expose
nothing beyond the cluster network and hold no credentials."""

import importlib.util
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import ray
import torch
import yaml

from audiodiff import __version__
from audiodiff.cli import build_parser

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
IMAGE = f"audiodiff:{__version__}"
KUBERAY = {path.name: list(yaml.safe_load_all(path.read_text())) for path in (CLUSTER / "kuberay").glob("*.yaml")}
LAUNCHER = yaml.safe_load((CLUSTER / "launcher" / "aws.yaml").read_text())


def walk(node):
    """Every mapping inside a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def documents(kind: str) -> list[dict]:
    return [d for docs in KUBERAY.values() for d in docs if d["kind"] == kind]


def uses_the_token(container: dict, volumes: list[dict]) -> bool:
    """Token authentication on, the token a file mounted from the Secret (never an environment variable)."""
    env = {e["name"]: e for e in container["env"]}
    path = env["RAY_AUTH_TOKEN_PATH"]["value"]
    secrets = {v["name"] for v in volumes if v.get("secret", {}).get("secretName") == "audiodiff-ray-token"}
    return (env["RAY_AUTH_MODE"].get("value") == "token" and "RAY_AUTH_TOKEN" not in env
            and any(m["name"] in secrets and m.get("readOnly") and path == f"{m['mountPath']}/auth_token"
                    for m in container["volumeMounts"]))


def test_ray_cluster_runs_our_image_and_ray_version_with_an_autoscaled_gpu_group():
    [cluster] = documents("RayCluster")
    spec = cluster["spec"]
    assert cluster["apiVersion"] == "ray.io/v1" and spec["rayVersion"] == ray.__version__
    head_pod = spec["headGroupSpec"]["template"]["spec"]
    assert spec["enableInTreeAutoscaling"] is True and uses_the_token(spec["autoscalerOptions"], head_pod["volumes"])
    head = head_pod["containers"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for pod in [head_pod] + [g["template"]["spec"] for g in groups.values()]:
        for container in pod["containers"]:
            assert container["image"] == IMAGE and uses_the_token(container, pod["volumes"])
    assert not any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in head)
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    # whole multi-GPU nodes: DDP's all-reduce stays inside a node (issue 24: 1-GPU pods all-reduce over TCP)
    assert gpu["limits"] == gpu["requests"] and int(gpu["limits"]["nvidia.com/gpu"]) >= 4
    [finetune] = KUBERAY["rayjob-finetune.yaml"]
    workers = int(shlex.split(finetune["spec"]["entrypoint"])[shlex.split(finetune["spec"]["entrypoint"]).index(
        "--num-workers") + 1])
    assert workers <= int(gpu["limits"]["nvidia.com/gpu"])  # the fine-tune's workers fit in one GPU pod
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] > 0


@pytest.mark.parametrize("stage", ["preprocess", "finetune", "generate"])
def test_ray_job_submits_a_valid_command_to_the_cluster(stage):
    [job] = KUBERAY[f"rayjob-{stage}.yaml"]
    [cluster] = documents("RayCluster")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    python, script, *args = shlex.split(job["spec"]["entrypoint"])
    assert python == "python" and script == f"/home/ray/audiodiff/jobs/{stage}.py"  # where cluster/Dockerfile puts it
    assert build_parser().parse_args([stage, *args]).stage == stage  # argparse exits on a flag that does not exist
    pod = job["spec"]["submitterPodTemplate"]
    [submitter] = pod["spec"]["containers"]
    assert submitter["image"] == IMAGE and uses_the_token(submitter, pod["spec"]["volumes"])
    assert pod["metadata"]["labels"] == {"audiodiff/ray-job-submitter": "true"}  # what the NetworkPolicy admits


def test_launcher_has_a_cpu_head_gpu_workers_and_a_loopback_dashboard():
    nodes = LAUNCHER["available_node_types"]
    assert LAUNCHER["provider"]["type"] == "aws" and LAUNCHER["docker"]["image"] == IMAGE
    assert nodes[LAUNCHER["head_node_type"]]["resources"] == {"CPU": 0}
    assert nodes["gpu_worker"]["resources"]["GPU"] >= 4  # whole multi-GPU instances, not 1-GPU g5.2xlarge
    for name, node in nodes.items():
        if name != LAUNCHER["head_node_type"]:
            assert 0 <= node["min_workers"] <= node["max_workers"] <= LAUNCHER["max_workers"]
    assert "--dashboard-host=127.0.0.1" in " ".join(LAUNCHER["head_start_ray_commands"])
    assert "--env RAY_AUTH_MODE=token" in LAUNCHER["docker"]["run_options"]
    assert LAUNCHER["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # the token itself stays out


def test_image_is_the_official_ray_gpu_image_for_our_ray_and_python():
    base = re.search(r"^FROM (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"


def test_nothing_is_exposed_beyond_the_cluster_network():
    for name, docs in KUBERAY.items():
        for mapping in (m for d in docs for m in walk(d)):
            assert mapping.get("kind") != "Ingress", name
            assert mapping.get("serviceType", "ClusterIP") == "ClusterIP", name
            assert mapping.get("type") not in ("LoadBalancer", "NodePort"), name
            assert not mapping.get("hostNetwork") and "hostPort" not in mapping and not mapping.get("enableIngress")
    # all interfaces only where KubeRay puts the head's dashboard anyway (said out loud), inside the pod network
    [cluster] = documents("RayCluster")
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    for path in CLUSTER.rglob("*"):
        if path.suffix in (".yaml", ".sh") or path.name == "Dockerfile":
            expected = 1 if path.name == "raycluster.yaml" else 0
            assert path.read_text().count("0.0.0.0") == expected, path


def test_only_the_clusters_own_pods_submitters_and_operator_reach_the_ray_pods():
    [policy] = documents("NetworkPolicy")
    [cluster] = documents("RayCluster")
    own = {"ray.io/cluster": cluster["metadata"]["name"]}  # the label KubeRay puts on every pod of the cluster
    assert policy["spec"]["podSelector"] == {"matchLabels": own} and policy["spec"]["policyTypes"] == ["Ingress"]
    peers, clients = policy["spec"]["ingress"]
    assert peers == {"from": [{"podSelector": {"matchLabels": own}}]}  # Ray's nodes: every port among themselves
    assert clients["ports"] == [{"port": 8265, "protocol": "TCP"}]  # everyone else: the job API only
    submitters, operator = clients["from"]
    assert submitters == {"podSelector": {"matchLabels": {"audiodiff/ray-job-submitter": "true"}}}
    assert operator["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
    assert set(operator["namespaceSelector"]["matchLabels"]) == {"kubernetes.io/metadata.name"}


def test_no_credentials_in_cluster_files():
    secret_looking = re.compile(r"(A3T[A-Z0-9]|AKIA|ASIA)[A-Z0-9]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|"
                                r"aws_secret_access_key|AWS_SECRET_ACCESS_KEY\s*[:=]\s*\S|\b[0-9a-f]{64}\b")
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            assert not secret_looking.search(path.read_text()), path
    for mapping in (m for docs in KUBERAY.values() for d in docs for m in walk(d)):
        if "name" in mapping and "value" in mapping:  # a container env entry: secrets come by reference only ...
            if mapping["name"].endswith("_PATH"):  # ... or as a file mounted from a Secret
                assert mapping["value"].startswith("/etc/"), mapping
            else:
                assert not re.search(r"TOKEN|SECRET|PASSWORD|KEY", mapping["name"]), mapping


def head_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    """cluster/local-head.sh with only the given state variables set (no Ray starts for `status` and `stop`)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("AUDIODIFF_HEAD_DIR", "XDG_RUNTIME_DIR", "TMPDIR")}
    return subprocess.run([str(CLUSTER / "local-head.sh"), *args], env={**clean, **env}, capture_output=True,
                          text=True, timeout=60)


def test_local_head_keeps_its_state_in_a_folder_only_the_user_can_enter(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    assert head_script("status", XDG_RUNTIME_DIR=str(runtime)).returncode == 1  # no head, but the folder is made
    made = (runtime / "audiodiff-head").stat()
    assert stat.S_IMODE(made.st_mode) == 0o700 and made.st_uid == os.getuid()
    default = tmp_path / f"audiodiff-head-{os.getuid()}"
    assert head_script("status", TMPDIR=str(tmp_path)).stdout == f"no head running from {default}\n"
    assert stat.S_IMODE(default.stat().st_mode) == 0o700
    assert "umask 077" in (CLUSTER / "local-head.sh").read_text()  # the log and Ray's files: the user's alone


@pytest.mark.parametrize("kind", ["open to others", "a link planted at the default name"])
def test_local_head_refuses_a_state_folder_others_can_enter_or_a_link(tmp_path, kind):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    state = runtime / "audiodiff-head"
    if kind == "open to others":
        state.mkdir()
        state.chmod(0o755)
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        state.symlink_to(tmp_path / "elsewhere")
    for command in ("start", "status", "stop"):
        result = head_script(command, XDG_RUNTIME_DIR=str(runtime))
        assert result.returncode == 1 and "not a folder of yours that only you can enter" in result.stderr, command


def test_local_head_stop_ends_only_the_head_it_started(tmp_path):
    """A pid in head.pid that is not this folder's `ray start --head` (a swapped file, a reused pid) is left alone."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)  # leads its own session, as the head does
    try:
        (state / "head.pid").write_text(f"{other.pid}\n")
        stop = head_script("stop", AUDIODIFF_HEAD_DIR=str(state))
        assert stop.returncode == 0 and stop.stdout == f"no head running from {state}\n"
        assert other.poll() is None and not (state / "head.pid").exists()
    finally:
        other.kill()
        other.wait()


def test_pods_run_as_non_root_without_privilege_escalation():
    pods = [d["spec"]["headGroupSpec"]["template"]["spec"] for d in documents("RayCluster")]
    pods += [g["template"]["spec"] for d in documents("RayCluster") for g in d["spec"]["workerGroupSpecs"]]
    pods += [d["spec"]["submitterPodTemplate"]["spec"] for d in documents("RayJob")]
    assert len(pods) == 6
    [cluster] = documents("RayCluster")
    autoscaler = cluster["spec"]["autoscalerOptions"]["securityContext"]  # a container the operator adds to the head
    assert autoscaler["allowPrivilegeEscalation"] is False and autoscaler["capabilities"]["drop"] == ["ALL"]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
            assert not context.get("privileged") and "runAsUser" not in context


def test_ray_jobs_name_the_published_hub_model():
    for stage in ("preprocess", "finetune"):
        [job] = KUBERAY[f"rayjob-{stage}.yaml"]
        args = shlex.split(job["spec"]["entrypoint"])
        assert args[args.index("--model") + 1] == "teticio/audio-diffusion-instrumental-hiphop-256", stage


def test_launcher_nodes_use_our_security_group_roles_and_an_ami_with_the_driver_we_need():
    nodes = LAUNCHER["available_node_types"]
    for name, node in nodes.items():
        config = node["node_config"]
        # a group of the user's on every node type: the launcher makes one that admits SSH from 0.0.0.0/0 otherwise
        assert config["SecurityGroupIds"] and "ImageId" in config, name
        assert config["IamInstanceProfile"]["Name"] == ("audiodiff-head" if name == LAUNCHER["head_node_type"]
                                                        else "audiodiff-bucket"), name
    start = LAUNCHER["worker_start_ray_commands"]
    assert start.index("audiodiff-check-gpu") < next(i for i, c in enumerate(start) if "ray start" in c)
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "COPY --chown=ray:users cluster/check-gpu.sh /home/ray/bin/audiodiff-check-gpu" in dockerfile
    assert "ENV PATH=/home/ray/bin:$PATH" in dockerfile
    if torch.version.cuda:  # the build checks the CUDA build the driver requirement is stated for: pyproject's torch
        assert f"torch.version.cuda == '{torch.version.cuda}'" in dockerfile and torch.version.cuda == "13.0"


def test_the_head_role_in_the_readme_is_scoped():
    readme = (CLUSTER / "README.md").read_text()
    policy = json.loads(re.search(r"```json\n(.*?)```", readme, re.S).group(1))
    statements = {s["Sid"]: s for s in policy["Statement"]}
    actions = [a for s in statements.values() for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])]
    assert not any(a.endswith("*") for a in actions)  # no ec2:*, s3:*
    nodes = LAUNCHER["available_node_types"]
    launched = statements["AutoscalerLaunches"]["Condition"]["StringEqualsIfExists"]["ec2:InstanceType"]
    assert sorted(launched) == sorted(n["node_config"]["InstanceType"] for name, n in nodes.items()
                                      if name != LAUNCHER["head_node_type"])
    ends = statements["AutoscalerEndsItsOwnNodes"]["Condition"]["StringEquals"]
    assert ends == {"ec2:ResourceTag/ray-cluster-name": LAUNCHER["cluster_name"]}
    assert statements["WorkersRole"]["Resource"].endswith(":role/audiodiff-bucket")
    assert all(s["Resource"].startswith("arn:aws:s3:::your-bucket") for sid, s in statements.items() if "Bucket" in sid)


def fake_nvidia_smi(folder: Path, rows: str) -> dict:
    (folder / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '{rows}'\n")
    (folder / "nvidia-smi").chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("rows, refused", [
    ("0, NVIDIA H100 80GB HBM3, 580.65.06, 9.0\\n1, NVIDIA H100 80GB HBM3, 580.65.06, 9.0\\n", None),
    ("0, NVIDIA A10G, 570.133.20, 8.6\\n", "GPU 0: driver 570.133.20 is older than R580"),
    ("0, Tesla V100-SXM2-16GB, 580.65.06, 7.0\\n", "compute capability 7.0) is not supported by CUDA 13.0"),
])
def test_a_gpu_node_whose_driver_or_gpu_cannot_run_the_image_is_refused_by_name(tmp_path, rows, refused):
    check = subprocess.run([str(CLUSTER / "check-gpu.sh")], env=fake_nvidia_smi(tmp_path, rows),
                           capture_output=True, text=True, timeout=60)
    assert check.stdout.startswith("GPU 0: ")
    if refused is None:
        assert (check.returncode, check.stderr) == (0, "")
    else:
        assert check.returncode == 1 and refused in check.stderr


def test_a_node_without_nvidia_smi_is_a_cpu_node(tmp_path):
    (tmp_path / "bash").symlink_to(shutil.which("bash"))  # a PATH with bash and nothing else
    check = subprocess.run(["bash", str(CLUSTER / "check-gpu.sh")], env={**os.environ, "PATH": str(tmp_path)},
                           capture_output=True, text=True, timeout=60)
    assert (check.returncode, check.stdout, check.stderr) == (0, "", "")


def test_the_sizing_tables_quote_the_counted_flops_and_bytes():
    """cluster/README.md's "Scale on paper" derives from benchmarks/count_flops.py's figures: they must be its own."""
    script = CLUSTER.parent / "benchmarks" / "count_flops.py"
    spec = importlib.util.spec_from_file_location("count_flops", script)
    count_flops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(count_flops)
    counted = count_flops.count()
    readme = (CLUSTER / "README.md").read_text().replace("\n", " ")
    for figure in (f"{counted['parameters']:,} parameters", f"{counted['forward_gflop_256x256']:,.1f} GFLOP at 256x256",
                   f"{counted['forward_gflop_256x1024']:,.1f} GFLOP at 256x1024",
                   f"{counted['train_step_gflop_256x256']:,.1f} GFLOP per 256x256 image",
                   f"weights {counted['weights_fp32_bytes'] / 1e6:.1f} MB in fp32",
                   f"{counted['saved_activations_fp32_bytes_per_image_256x256'] / 1e9:.2f} GB per image"):
        assert figure in readme, figure
