"""audiodiff.runtime against a cluster it is told about: sizing from the node groups that will run the work, local
paths refused on multi-node clusters in every stage, and a local Ray's private temp folder. No Ray starts here:
`ray.nodes` and the autoscaler's report are replaced by a fake cluster view."""

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import ray
from ray._private.state import state
from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig

from audiodiff import runtime
from audiodiff.errors import AudiodiffError
from audiodiff.models import new_model, save_model
from audiodiff.synth import write_examples

HEAD = {"CPU": 0, "memory": 32e9, "object_store_memory": 8e9}  # drivers only, as in cluster/


@pytest.fixture
def cluster(monkeypatch):
    """Sets the cluster view: the live nodes' resources, and the autoscaler's node groups as
    (name, resources of one node, max_count)."""
    def view(nodes: list[dict], groups: list[tuple[str, dict, int]] = ()) -> None:
        monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": r} for r in nodes])
        config = ClusterConfig(node_group_configs=[NodeGroupConfig(name=n, resources=r, min_count=0, max_count=c)
                                                   for n, r, c in groups]) if groups else None
        monkeypatch.setattr(state, "get_cluster_config", lambda: config)
    return view


def kuberay(cluster) -> None:
    """raycluster.yaml as the autoscaler reports it, only the head up: 16-CPU pods and 4-GPU pods, from zero."""
    cluster([HEAD], [("cpu", {"CPU": 16}, 16), ("gpu", {"CPU": 44, "GPU": 4}, 2)])


def test_sizing_counts_the_groups_that_start_at_zero_and_cpu_work_only_the_cpu_groups(cluster):
    kuberay(cluster)
    assert runtime.cluster_capacity("GPU") == 8 and runtime.largest_node("GPU") == 4  # DDP inside one node: 4
    assert runtime.cluster_capacity("CPU") == 16 * 16 + 2 * 44
    assert runtime.cluster_capacity("CPU", cpu_only=True) == 16 * 16  # preprocessing runs on the CPU group
    assert runtime.largest_node("CPU") == 44
    cluster([{"CPU": 16, "GPU": 1}])  # a workstation with a GPU: its CPUs are the CPU work's too
    assert runtime.cluster_capacity("CPU", cpu_only=True) == 16 and runtime.cluster_capacity("GPU") == 1


def test_preprocess_pool_grows_to_the_cpus_of_the_nodes_without_gpus(cluster):
    from audiodiff.mel import MelConfig
    from audiodiff.preprocess import PreprocessConfig, make_spectrograms

    class Tracks:
        def map_batches(self, fn, **options):
            return options["compute"]

    kuberay(cluster)
    pool = make_spectrograms(Tracks(), MelConfig(), PreprocessConfig(sources=["x"], output="s3://b/x"))
    assert (pool.min_size, pool.max_size) == (1, 256)


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "model"
    save_model(new_model("tiny"), str(folder))
    return str(folder)


def stages(tmp_path, model_folder):
    """Each stage given one local input (the one its message must name) and object storage for the rest."""
    from audiodiff.evaluate import EvaluateConfig, run_evaluate
    from audiodiff.generate import GenerateConfig, run_generate
    from audiodiff.preprocess import PreprocessConfig, run_preprocess
    from audiodiff.remix import RemixConfig, run_remix
    from audiodiff.train import TrainConfig, run_finetune

    audio, data = tmp_path / "audio", tmp_path / "spectrograms"
    data.mkdir(exist_ok=True)
    write_examples(str(audio), tracks_per_genre=1, seconds=1.0)
    return {
        "preprocess": (run_preprocess, PreprocessConfig(sources=[str(audio)], output="s3://b/d"), str(audio)),
        "finetune": (run_finetune, TrainConfig(data=str(data), model="tiny", output="s3://b/m"), str(data)),
        "finetune model": (run_finetune, TrainConfig(data="s3://b/d", model=model_folder, output="s3://b/m"),
                           model_folder),
        "generate": (run_generate, GenerateConfig(model=model_folder, output="s3://b/c"), model_folder),
        "remix": (run_remix, RemixConfig(model="tiny", output="s3://b/r", sources=[str(audio)]), str(audio)),
        "evaluate": (run_evaluate, EvaluateConfig(clips=str(audio), reference=str(audio)), str(audio)),
    }


@pytest.mark.parametrize("stage", ["preprocess", "finetune", "finetune model", "generate", "remix", "evaluate"])
def test_every_stage_refuses_a_local_input_before_work_on_a_cluster_that_can_grow(cluster, tmp_path, model_folder,
                                                                                 stage, s3_endpoint):
    # s3_endpoint: the outputs' s3://b/ is the loopback server's (alone, this test looked their bucket up on AWS)
    run, config, local = stages(tmp_path, model_folder)[stage]
    kuberay(cluster)
    with pytest.raises(AudiodiffError, match=f"^{local}: a local path, but the Ray cluster has 1 nodes and can add "
                                             "more, each of which reads from its own disk; give an object-storage"):
        run(config)


def test_local_paths_are_fine_on_one_node_or_shared_and_hub_ids_presets_and_uris_everywhere(cluster, tmp_path,
                                                                                           monkeypatch):
    local = str(tmp_path)
    cluster([{"CPU": 8}])
    runtime.check_paths_reachable(False, local, [local])
    cluster([{"CPU": 8}, {"CPU": 8}])
    with pytest.raises(AudiodiffError, match=f"^{local}: a local path, but the Ray cluster has 2 nodes, each of "
                                             "which writes to its own disk"):
        runtime.check_paths_reachable(False, local, ["s3://b/in"])
    runtime.check_paths_reachable(True, local, [local])  # --shared-path: every node mounts it
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # a preset is a preset even where a folder has its name
    runtime.check_paths_reachable(False, "gs://b/out", ["tiny", "teticio/audio-diffusion-256", "hf://datasets/a/b",
                                                       "s3://b/model", "no/such/folder/here"])


@pytest.fixture
def short_tmp():
    """A folder with a short path, as a runtime folder has (pytest's own are too long for Ray's sockets)."""
    folder = tempfile.mkdtemp(prefix="ad-")
    yield Path(folder)
    shutil.rmtree(folder)


def test_a_local_ray_keeps_its_files_in_a_folder_only_the_user_can_enter(monkeypatch, short_tmp):
    started = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **options: started.update(options))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_tmp))
    runtime.init_ray()
    assert started["_temp_dir"] == str(short_tmp / "audiodiff-ray" / "ray")  # Ray opens its own to all: one down
    folder = os.lstat(short_tmp / "audiodiff-ray")
    assert stat.S_ISDIR(folder.st_mode) and folder.st_uid == os.getuid() and stat.S_IMODE(folder.st_mode) == 0o700
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setattr("tempfile.tempdir", str(short_tmp))  # no runtime folder: a name of the user's in TMPDIR
    assert runtime.private_temp_dir() == str(short_tmp / f"audiodiff-ray-{os.getuid()}" / "ray")


def test_a_temp_folder_someone_else_made_or_opened_up_is_refused(monkeypatch, short_tmp):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_tmp))
    folder = short_tmp / "audiodiff-ray"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    with pytest.raises(AudiodiffError, match=rf"^{folder}: the local Ray's temp folder must be a folder of yours "
                                             r"that only you can enter \(found drwxr-xr-x"):
        runtime.private_temp_dir()
    folder.rmdir()
    folder.symlink_to(short_tmp)  # a planted link is not followed
    with pytest.raises(AudiodiffError, match=r"found lrwx"):
        runtime.private_temp_dir()
    folder.unlink()
    if os.getuid() == 0:  # only root can give a folder to someone else
        folder.mkdir(mode=0o700)
        os.chown(folder, 65534, 65534)
        with pytest.raises(AudiodiffError, match="owner uid 65534"):
            runtime.private_temp_dir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_tmp / ("x" * 30)))
    (short_tmp / ("x" * 30)).mkdir()
    with pytest.raises(AudiodiffError, match="too long a path for Ray's unix sockets"):
        runtime.private_temp_dir()
