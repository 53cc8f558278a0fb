"""The reader's own tar grouping (pipeline.data.tar_samples) against webdataset's, on shards that
webdataset's TarWriter writes: same keys, same entries, same bytes; damage is an error, not a guess."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from pipeline.data.tar_samples import iter_tar_samples, split_member_name


def _write_shard(path, samples):
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


def test_grouping_matches_webdatasets_own_reader(tmp_path):
    shard = tmp_path / "shard.tar"
    samples = [{"__key__": f"dir/{index:06d}", "png": bytes([index]) * (index + 1), "cls": str(index % 3).encode(),
                "seg.png": b"x" * index, "JSON": b"{}"} for index in range(7)]
    _write_shard(shard, samples)
    theirs = [{key: value for key, value in sample.items() if key != "__url__" and key != "__local_path__"}
              for sample in wds.WebDataset(str(shard), shardshuffle=False)]
    with open(shard, "rb") as stream:
        ours = list(iter_tar_samples(stream))
    assert ours == theirs
    with open(shard, "rb") as stream:
        wanted = list(iter_tar_samples(stream, suffixes={"png", "cls"}))
    assert [sorted(sample) for sample in wanted] == [["__key__", "cls", "png"]] * 7
    assert wanted[3]["png"] == bytes([3]) * 4


def test_member_names_split_at_the_first_dot_of_the_file_name():
    assert split_member_name("a.b/c/000001.seg.png") == ("a.b/c/000001", "seg.png")
    assert split_member_name("000001.PNG") == ("000001", "png")
    assert split_member_name("README") is None and split_member_name("dir/.hidden") is None


def _tar(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_a_key_met_twice_and_a_cut_archive_are_errors():
    interleaved = _tar([("a.png", b"1"), ("b.png", b"2"), ("a.png", b"3")])
    assert [sample["__key__"] for sample in iter_tar_samples(io.BytesIO(interleaved))] == ["a", "b", "a"]
    duplicate = _tar([("a.png", b"1"), ("a.png", b"2")])
    with pytest.raises(ValueError, match="duplicate file 'png' for sample 'a'"):
        list(iter_tar_samples(io.BytesIO(duplicate)))
    whole = _tar([("a.png", b"1" * 600), ("a.cls", b"2")])
    with pytest.raises(tarfile.TarError):
        list(iter_tar_samples(io.BytesIO(whole[:700])))
