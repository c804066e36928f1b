"""WebDataset and Parquet shards: read back with the libraries pipelines use, published whole, each row exactly once,
on local disk and on S3 (moto's server on loopback)."""

from __future__ import annotations

import io
import json
import os
import threading
from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest

from qwen_batch.io.storage import TEMP_PREFIX, Folder, s3_storage_options
from qwen_batch.outputs import dataset_card, shards
from qwen_batch.outputs.shards import PARQUET, WEBDATASET, Sample, ShardPublishError, ShardWriter
from tests.s3_server import keys

ODD_IDS = ["a.b.c", "dir/sub/x.png", "猫.一只", "sp ace", "e"]


def png(seed: int, size: int = 8) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 40 % 256, 10, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def sample(row_id: str, seed: int = 0, fingerprint: str = "f0", image: bytes | None = None) -> Sample:
    record = {
        "id": row_id,
        "prompt": f"prompt of {row_id}",
        "seed": seed,
        "width": 8,
        "height": 8,
        "loras": None,
        "status": "ok",
        "image": None,
        "shard": None,
        "key": None,
        "fingerprint": fingerprint,
        "sha256": "0" * 64,
        "finished_at": datetime.now(timezone.utc),
    }
    return Sample(row_id, png(seed) if image is None else image, "png", record, f"prompt of {row_id}")


def write(output: Folder, kind: str, samples: list[Sample], **options) -> list[shards.PublishedShard]:
    writer = ShardWriter(output, kind, **{"rows_per_shard": 2, "max_bytes": shards.DEFAULT_SHARD_BYTES, **options})
    published = [shard for item in samples for shard in writer.add(item)]
    return published + writer.close()


def temporaries(root) -> list[str]:
    return [name for _, _, names in os.walk(root) for name in names if name.startswith(TEMP_PREFIX)]


def test_webdataset_shards_read_back_with_webdataset(tmp_path):
    import webdataset as wds
    from PIL import Image

    output = Folder(str(tmp_path / "out"))
    published = write(output, WEBDATASET, [sample(row_id, seed) for seed, row_id in enumerate(ODD_IDS)])
    assert [shard.relative for shard in published] == ["shards/00000.tar", "shards/00001.tar", "shards/00002.tar"]
    assert [shard.rows for shard in published] == [2, 2, 1]
    keys_by_id = {row_id: key for shard in published for row_id, key in shard.keys.items()}
    assert set(keys_by_id) == set(ODD_IDS)
    assert len(set(keys_by_id.values())) == len(ODD_IDS) and not any("." in key for key in keys_by_id.values())
    assert keys_by_id["a.b.c"] == "000000000" and keys_by_id["e"] == "000020000"

    urls = [str(tmp_path / "out" / shard.relative) for shard in published]
    seen = {}
    for item in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        record = json.loads(item["json"])
        assert record["key"] == item["__key__"] and keys_by_id[record["id"]] == item["__key__"]
        assert item["txt"].decode() == f"prompt of {record['id']}" == record["prompt"]
        with Image.open(io.BytesIO(item["png"])) as image:
            assert image.size == (8, 8)
        assert "image" not in record and "shard" not in record
        seen[record["id"]] = record
    assert set(seen) == set(ODD_IDS)

    sidecar = pq.read_table(tmp_path / "out" / "shards" / "00000.parquet").to_pylist()
    assert [(row["id"], row["key"]) for row in sidecar] == [("a.b.c", "000000000"), ("dir/sub/x.png", "000000001")]
    assert sidecar[0]["seed"] == 0 and sidecar[0]["fingerprint"] == "f0"
    stats = json.loads((tmp_path / "out" / "shards" / "00002_stats.json").read_bytes())
    assert stats["rows"] == 1 and stats["first_id"] == "e" and stats["image_format"] == "png"
    assert stats["bytes"] == published[2].bytes == os.path.getsize(urls[2])
    assert stats["written_by"].startswith("qwen-batch ")
    assert not temporaries(tmp_path)
    assert published[0].url == str(tmp_path / "out" / "shards" / "00000.tar")


def test_parquet_shards_load_as_a_hugging_face_dataset(tmp_path):
    import datasets
    from PIL import Image

    output = Folder(str(tmp_path / "out"))
    published = write(output, PARQUET, [sample(row_id, seed) for seed, row_id in enumerate(ODD_IDS)])
    assert [shard.relative for shard in published] == ["data/00000.parquet", "data/00001.parquet", "data/00002.parquet"]
    files = sorted(str(path) for path in (tmp_path / "out" / "data").glob("*.parquet"))
    loaded = datasets.load_dataset("parquet", data_files=files, split="train")
    assert isinstance(loaded.features["image"], datasets.Image)
    rows = list(loaded)
    assert [row["id"] for row in rows] == ODD_IDS
    for row in rows:
        assert isinstance(row["image"], Image.Image) and row["image"].size == (8, 8)
        assert row["prompt"] == f"prompt of {row['id']}" and "." not in row["key"]
    # The card: load_dataset(folder) finds the data files and features through its YAML.
    card = (tmp_path / "out" / "README.md").read_text()
    assert dataset_card.CARD_MARKER in card and "AI-generated" in card and "data/*.parquet" in card
    by_card = datasets.load_dataset(str(tmp_path / "out"), split="train")
    assert isinstance(by_card.features["image"], datasets.Image) and by_card.num_rows == len(ODD_IDS)
    # A card a person edited stays as it is.
    (tmp_path / "out" / "README.md").write_text("# my dataset\n")
    write(output, PARQUET, [sample("more")])
    assert (tmp_path / "out" / "README.md").read_text() == "# my dataset\n"


def test_rows_and_byte_cap_split_shards(tmp_path):
    output = Folder(str(tmp_path / "out"))
    image = os.urandom(3000)  # incompressible, so sizes are predictable
    items = [sample(f"r{index}", image=image) for index in range(5)]
    # A sample in a tar: 3584 bytes of image, 1024 of json, 1024 of prompt (headers and padding included); 1024 bytes
    # end the archive: two samples make 12288 bytes, three would pass 13000.
    published = write(output, WEBDATASET, items, rows_per_shard=100, max_bytes=13000)
    assert [shard.rows for shard in published] == [2, 2, 1]
    parquet = write(Folder(str(tmp_path / "pq")), PARQUET, items, rows_per_shard=100, max_bytes=7000)
    assert [shard.rows for shard in parquet] == [2, 2, 1]
    # One sample over the cap alone makes a shard of its own.
    alone = write(Folder(str(tmp_path / "big")), WEBDATASET, items[:2], rows_per_shard=100, max_bytes=1000)
    assert [shard.rows for shard in alone] == [1, 1]


def test_workers_write_disjoint_numbers_and_later_runs_never_reuse_one(tmp_path):
    output = Folder(str(tmp_path / "out"))
    writers = [ShardWriter(output, WEBDATASET, rows_per_shard=1, worker=index, workers=2) for index in range(2)]
    results: dict[int, list] = {0: [], 1: []}

    def work(index: int) -> None:
        for row in range(4):
            results[index] += writers[index].add(sample(f"w{index}-{row}"))
        results[index] += writers[index].close()

    threads = [threading.Thread(target=work, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [shard.number for shard in results[0]] == [0, 2, 4, 6]
    assert [shard.number for shard in results[1]] == [1, 3, 5, 7]
    later = write(output, WEBDATASET, [sample("late")], worker=1, workers=3)
    assert [shard.number for shard in later] == [10]  # above 7, = 1 (mod 3)
    assert len(shards.published_rows(output, WEBDATASET)) == 9


def test_two_threads_on_one_writer_publish_every_row_once(tmp_path):
    output = Folder(str(tmp_path / "out"))
    writer = ShardWriter(output, PARQUET, rows_per_shard=3)
    published: list = []
    lock = threading.Lock()

    def work(prefix: str) -> None:
        for row in range(10):
            done = writer.add(sample(f"{prefix}{row}"))
            with lock:
                published.extend(done)

    threads = [threading.Thread(target=work, args=(prefix,)) for prefix in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    published += writer.close()
    ids = [row_id for shard in published for row_id in shard.keys]
    assert sorted(ids) == sorted(f"{prefix}{row}" for prefix in "ab" for row in range(10))
    assert sum(shard.rows for shard in published) == 20
    assert set(shards.published_rows(output, PARQUET)) == set(ids)


@pytest.mark.parametrize("kind", [WEBDATASET, PARQUET])
def test_published_rows_adopt_unrecorded_shards_and_rebuild_sidecars(tmp_path, kind):
    output = Folder(str(tmp_path / "out"))
    published = write(output, kind, [sample(row_id, seed) for seed, row_id in enumerate(ODD_IDS)])
    folder = tmp_path / "out" / shards.FOLDERS[kind]
    # A kill between the data file and its sidecars: none of them there, and no results part file either.
    for path in folder.iterdir():
        if path.name.startswith("00001") and path.name != os.path.basename(published[1].relative):
            path.unlink()
    rows = shards.published_rows(output, kind)
    assert set(rows) == set(ODD_IDS)
    row = rows["猫.一只"]
    assert row.shard == published[1].relative and row.key == published[1].keys["猫.一只"]
    assert row.fingerprint == "f0" and row.record["seed"] == 2 and isinstance(row.record["finished_at"], datetime)
    assert (folder / "00001_stats.json").exists()
    if kind == WEBDATASET:
        assert [item["id"] for item in pq.read_table(folder / "00001.parquet").to_pylist()] == ["猫.一只", "sp ace"]


def test_a_stale_sidecar_is_not_trusted(tmp_path):
    output = Folder(str(tmp_path / "out"))
    write(output, WEBDATASET, [sample("a"), sample("b")])
    folder = tmp_path / "out" / "shards"
    stale = (folder / "00000.parquet").read_bytes()
    shards.remove_rows(output, WEBDATASET, {"shards/00000.tar": {"a"}})
    # A kill after the tar was replaced, before its sidecar was: the old sidecar still lists "a".
    (folder / "00000.parquet").write_bytes(stale)
    assert set(shards.published_rows(output, WEBDATASET)) == {"b"}
    assert [row["id"] for row in pq.read_table(folder / "00000.parquet").to_pylist()] == ["b"]  # rebuilt


@pytest.mark.parametrize("kind", [WEBDATASET, PARQUET])
def test_remove_rows_rewrites_a_shard_and_deletes_an_emptied_one(tmp_path, kind):
    output = Folder(str(tmp_path / "out"))
    published = write(output, kind, [sample(row_id) for row_id in ["a", "b", "c"]])
    first, second = published[0].relative, published[1].relative
    shards.remove_rows(output, kind, {first: {"a"}, second: {"c"}})
    rows = shards.published_rows(output, kind)
    assert set(rows) == {"b"} and rows["b"].key == published[0].keys["b"]  # keys stay
    assert not output.exists(second)
    assert output.list_files(shards.FOLDERS[kind]) == sorted(
        name for name in output.list_files(shards.FOLDERS[kind]) if name.split("/")[-1].startswith("00000")
    )
    stats = json.loads(output.read_bytes(shards.shard_name(kind, 0, shards.STATS_SUFFIX)))
    assert stats["rows"] == 1 and stats["first_id"] == "b"
    if kind == WEBDATASET:
        import webdataset as wds

        items = list(wds.WebDataset([str(tmp_path / "out" / first)], shardshuffle=False, empty_check=False))
        assert [json.loads(item["json"])["id"] for item in items] == ["b"] and "png" in items[0]
    else:
        table = pq.read_table(tmp_path / "out" / first)
        assert table.column("id").to_pylist() == ["b"] and b"huggingface" in table.schema.metadata
    assert not temporaries(tmp_path)


def test_a_changed_row_is_removed_then_written_again_never_twice(tmp_path):
    output = Folder(str(tmp_path / "out"))
    write(output, WEBDATASET, [sample("a"), sample("b")])
    old = shards.published_rows(output, WEBDATASET)["a"]
    shards.remove_rows(output, WEBDATASET, {old.shard: {"a"}})
    write(output, WEBDATASET, [sample("a", fingerprint="f1")])
    scan = shards.scan_shards(output, WEBDATASET)
    assert scan.rows["a"].fingerprint == "f1" and scan.rows["a"].shard == "shards/00001.tar"
    assert not scan.duplicates


def test_duplicates_keep_the_newest_and_are_reported(tmp_path):
    output = Folder(str(tmp_path / "out"))
    write(output, PARQUET, [sample("a"), sample("b")])
    write(output, PARQUET, [sample("a", fingerprint="new")])
    scan = shards.scan_shards(output, PARQUET)
    assert scan.rows["a"].fingerprint == "new" and scan.rows["a"].number == 1
    assert [(row.id, row.shard) for row in scan.duplicates] == [("a", "data/00000.parquet")]
    shards.remove_rows(output, PARQUET, scan.removals())
    again = shards.scan_shards(output, PARQUET)
    assert not again.duplicates and again.rows["a"].fingerprint == "new" and set(again.rows) == {"a", "b"}


@pytest.mark.parametrize("kind", [WEBDATASET, PARQUET])
def test_a_crash_while_publishing_leaves_no_visible_shard(tmp_path, kind, monkeypatch):
    output = Folder(str(tmp_path / "out"))
    write(output, kind, [sample("a")], rows_per_shard=1)

    def killed(*args):
        raise OSError("killed mid-publish")

    monkeypatch.setattr(shards.os, "replace", killed)
    writer = ShardWriter(output, kind, rows_per_shard=2)
    writer.add(sample("b"))
    with pytest.raises(ShardPublishError) as raised:
        writer.add(sample("c"))
    assert raised.value.ids == ["b", "c"]
    monkeypatch.undo()
    assert output.list_files() == sorted(output.list_files())  # no temporaries listed
    assert set(shards.published_rows(output, kind)) == {"a"}
    assert not temporaries(tmp_path)
    # A killed writer's spool left behind (SIGKILL: no cleanup) is never listed, never read, never numbered.
    leftover = tmp_path / "out" / shards.FOLDERS[kind] / f"{TEMP_PREFIX}dead-00007{shards.DATA_SUFFIX[kind]}"
    leftover.write_bytes(b"half a shard")
    assert not [name for name in output.list_files() if TEMP_PREFIX in name]
    assert set(shards.published_rows(output, kind)) == {"a"}
    assert write(output, kind, [sample("d")])[0].number == 1


def test_a_failure_inside_the_spool_discards_the_shard(tmp_path, monkeypatch):
    output = Folder(str(tmp_path / "out"))
    writer = ShardWriter(output, WEBDATASET, rows_per_shard=5)
    writer.add(sample("a"))
    monkeypatch.setattr(shards._TarSpool, "add", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(ShardPublishError) as raised:
        writer.add(sample("b"))
    assert raised.value.ids == ["a", "b"]
    monkeypatch.undo()
    assert writer.close() == [] and not temporaries(tmp_path) and output.list_files() == []


def test_shards_on_s3(s3_endpoint, s3, bucket, tmp_path):
    import datasets
    import webdataset as wds

    options = s3_storage_options(endpoint_url=s3_endpoint)
    for kind in (WEBDATASET, PARQUET):
        output = Folder(f"s3://{bucket}/runs/{kind}", options)
        published = write(output, kind, [sample(row_id, seed) for seed, row_id in enumerate(ODD_IDS)])
        assert published[0].url == f"s3://{bucket}/runs/{kind}/{shards.shard_name(kind, 0)}"
        stored = keys(s3, bucket, f"runs/{kind}/")
        assert not [key for key in stored if TEMP_PREFIX in key]
        assert {f"runs/{kind}/{shard.relative}" for shard in published} <= set(stored)
        local = tmp_path / kind
        local.mkdir()
        for shard in published:
            body = s3.get_object(Bucket=bucket, Key=f"runs/{kind}/{shard.relative}")["Body"].read()
            (local / os.path.basename(shard.relative)).write_bytes(body)
        if kind == WEBDATASET:
            items = wds.WebDataset(sorted(str(path) for path in local.iterdir()), shardshuffle=False, empty_check=False)
            assert sorted(json.loads(item["json"])["id"] for item in items) == sorted(ODD_IDS)
        else:
            loaded = datasets.load_dataset("parquet", data_files=sorted(str(path) for path in local.iterdir()))
            assert loaded["train"]["id"] == ODD_IDS
            assert f"runs/{kind}/README.md" in stored
        # Sidecars lost (a kill after the shard): rebuilt from the shard; then a row removed, a shard emptied.
        s3.delete_object(Bucket=bucket, Key=f"runs/{kind}/{shards.shard_name(kind, 1, shards.STATS_SUFFIX)}")
        rows = shards.published_rows(output, kind)
        assert set(rows) == set(ODD_IDS) and rows["e"].shard == shards.shard_name(kind, 2)
        assert f"runs/{kind}/{shards.shard_name(kind, 1, shards.STATS_SUFFIX)}" in keys(s3, bucket, f"runs/{kind}/")
        shards.remove_rows(output, kind, {rows["a.b.c"].shard: {"a.b.c"}, rows["e"].shard: {"e"}})
        assert set(shards.published_rows(output, kind)) == set(ODD_IDS) - {"a.b.c", "e"}
        assert not [key for key in keys(s3, bucket, f"runs/{kind}/") if "/00002" in key]


@pytest.mark.parametrize("kind", [WEBDATASET, PARQUET])
def test_published_rows_reads_current_sidecars_not_the_shards(tmp_path, kind, monkeypatch):
    output = Folder(str(tmp_path / "out"))
    write(output, kind, [sample(row_id) for row_id in ODD_IDS])

    def forbidden(*args):
        raise AssertionError("read the tar or rewrote sidecars although they were current")

    monkeypatch.setattr(shards, "_read_tar_rows", forbidden)
    monkeypatch.setattr(shards, "_write_sidecars", forbidden)
    assert set(shards.published_rows(output, kind)) == set(ODD_IDS)
