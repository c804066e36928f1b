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
