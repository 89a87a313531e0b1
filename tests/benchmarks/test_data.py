"""`es3 bench data` on augmented frames mixed with SA-1B pseudo-videos: one record per worker count,
with the batches' real sizes."""

import json

from es3_jax.cli import main


def test_bench_data_with_augmentation_and_sa1b(tmp_path, capsys):
    out = tmp_path / "data.jsonl"
    argv = ["bench", "data", "--json", "--output", str(out), "--workers", "0", "--batches", "2"]
    argv += ["--warmup", "1", "--videos", "4", "--frames", "6", "--augment", "--sa1b", "0.3", "--batch", "2"]
    argv += ["--height", "60", "--width", "80", "--config", "configs/tiny.yaml", "DATA.NUM_FRAMES", "3"]
    assert main(argv) == 0

    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["input"] == "frames 60x80 augmented + SA-1B 0.3"
    assert record["clips/s"] > 0 and record["images MB/step"] == 2 * 3 * 224 * 224 * 3 * 4 / 1e6
