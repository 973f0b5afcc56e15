import os

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pyarrow as pa
import pytest

from audiodiff import storage
from audiodiff.errors import AudiodiffError


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file":
        return f"file://{tmp_path}/root"
    return request.getfixturevalue("s3_bucket") + "/root"


def test_write_read_list_round_trip(root):
    storage.write_bytes(storage.join(root, "a.wav"), b"first")
    storage.write_bytes(storage.join(root, "sub dir", "b ü.flac"), b"second")
    storage.write_bytes(storage.join(root, "sub dir", "notes.txt"), b"third")
    assert storage.read_bytes(storage.join(root, "sub dir", "b ü.flac")) == b"second"
    assert storage.list_files(root, (".wav", ".flac")) == [storage.join(root, "a.wav"),
                                                           storage.join(root, "sub dir", "b ü.flac")]
    assert len(storage.list_files(root)) == 3
    assert storage.exists(storage.join(root, "a.wav")) and storage.is_dir(root)
    assert not storage.exists(storage.join(root, "nothing.wav"))


def test_overwrite_replaces_whole_file_and_leaves_no_temporaries(root):
    target = storage.join(root, "clip.wav")
    storage.write_bytes(target, b"x" * 1000)
    storage.write_bytes(target, b"short")
    assert storage.read_bytes(target) == b"short"
    assert storage.list_files(root) == [target]


def test_failed_local_write_leaves_nothing(tmp_path, monkeypatch):
    target = str(tmp_path / "out" / "clip.wav")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(AudiodiffError, match="clip.wav: cannot write"):
        storage.write_bytes(target, b"data")
    assert os.listdir(tmp_path / "out") == []


def test_missing_files_and_bad_schemes_give_clear_errors(root):
    with pytest.raises(AudiodiffError, match="nope.wav: no such file"):
        storage.read_bytes(storage.join(root, "nope.wav"))
    with pytest.raises(AudiodiffError, match="no such directory"):
        storage.list_files(storage.join(root, "nowhere"))
    with pytest.raises(AudiodiffError, match="unsupported storage scheme 'ftp://'"):
        storage.resolve("ftp://host/x")


def test_s3_filesystem_reaches_the_loopback_endpoint_and_pyarrow_datasets_work(s3_bucket):
    fs, path = storage.resolve(f"{s3_bucket}/tables/t.parquet")
    assert isinstance(fs, pafs.S3FileSystem)
    pq.write_table(pa.table({"x": [1, 2, 3]}), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs)["x"].to_pylist() == [1, 2, 3]


def test_upload_dir(s3_bucket, tmp_path):
    local = tmp_path / "model"
    (local / "unet").mkdir(parents=True)
    (local / "unet" / "config.json").write_text("{}")
    (local / "model_index.json").write_text("{}")
    storage.upload_dir(str(local), f"{s3_bucket}/model", last=("model_index.json",))
    assert storage.read_text(f"{s3_bucket}/model/unet/config.json") == "{}"
    assert storage.exists(f"{s3_bucket}/model/model_index.json")
