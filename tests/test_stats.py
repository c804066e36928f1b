"""Stats add up across batches, chunks and shards, and survive their one serialized form."""

from qwen_batch.pipeline.encode import EncodeStats
from qwen_batch.run.results import Record
from qwen_batch.run.summary import DenoiseStats


def test_counters_add_peaks_keep_the_larger_and_records_concatenate():
    first = DenoiseStats(generated=3, failed=1, seconds=2.5, peak_gpu_gib=None, cached_steps=8, records=[Record("a")])
    second = DenoiseStats(generated=2, seconds=1.5, peak_gpu_gib=30.0, adapter_fuses=1, records=[Record("b")])
    third = DenoiseStats(generated=1, peak_gpu_gib=41.5, cached_steps_computed=5)
    total = sum([first, second, third], start=DenoiseStats())
    assert (total.generated, total.failed, total.seconds) == (6, 1, 4.0)
    assert total.peak_gpu_gib == 41.5 and total.adapter_fuses == 1
    assert (total.cached_steps, total.cached_steps_computed) == (8, 5)
    assert [record.id for record in total.records] == ["a", "b"]
    assert sum([EncodeStats(), EncodeStats()], start=EncodeStats()).peak_gpu_gib is None, "nothing measured"


def test_to_dict_is_the_one_form_sent_around_and_reads_back():
    stats = DenoiseStats(generated=4, seconds=9.0, peak_gpu_gib=12.0, records=[Record("a")])
    data = stats.to_dict()
    assert "records" not in data, "records stay in the process: they go to the results files"
    assert DenoiseStats.from_dict(data) == DenoiseStats(generated=4, seconds=9.0, peak_gpu_gib=12.0)
    assert EncodeStats.from_dict(EncodeStats(texts=3, encoded=2).to_dict()) == EncodeStats(texts=3, encoded=2)


def test_the_fan_outs_merge_sums_the_shard_runs_that_finished_since_it_started(tmp_path):
    from datetime import datetime, timedelta, timezone

    from qwen_batch.io.storage import Folder
    from qwen_batch.run.summary import sum_shard_stats, write_shard_stats

    output = Folder(str(tmp_path))
    before = datetime.now(timezone.utc) - timedelta(seconds=2)
    write_shard_stats(output, "0/2", EncodeStats(encoded=3), DenoiseStats(generated=4, seconds=8.0, peak_gpu_gib=40.0))
    write_shard_stats(output, "1/2", EncodeStats(encoded=2), DenoiseStats(generated=5, seconds=9.0, peak_gpu_gib=42.0))
    encode, denoise, runs = sum_shard_stats(output, before)
    assert runs == 2 and encode.encoded == 5
    assert (denoise.generated, denoise.seconds, denoise.peak_gpu_gib) == (9, 17.0, 42.0)
    assert sum_shard_stats(output, datetime.now(timezone.utc) + timedelta(seconds=2))[2] == 0, "older runs: not summed"
