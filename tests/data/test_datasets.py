"""The datasets by name: layout errors name the path or the dataset."""

import pytest

from es3_jax.data import datasets
from es3_jax.data.videos import DatasetError


def test_layout_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="JPEGImages_24fps not found"):
        datasets.open_dataset("sav", tmp_path)
    root = tmp_path / "sav"
    for folder in ("JPEGImages_24fps", "Annotations_6fps"):
        (root / folder).mkdir(parents=True)
    with pytest.raises(DatasetError, match="nope"):
        datasets.open_dataset("sav", root, sequences=["nope"])
    with pytest.raises(DatasetError, match="no sequences"):
        datasets.open_dataset("sav", root)
    with pytest.raises(DatasetError, match="unknown dataset"):
        datasets.open_dataset("ytvos", root)
    with pytest.raises(DatasetError, match=r"JPEGImages[/\\]480p not found"):
        datasets.list_sequences("davis", tmp_path)

