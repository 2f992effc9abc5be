import os

import datasets
import numpy as np
import pytest
from PIL import Image

from balpoe_hf.data.split_lists import load_split_list
from balpoe_hf.data.splits import class_counts

# Relative path -> (label, RGB colour) of the generated images; one folder name and one file name hold spaces.
IMAGES = {
    "train/n01/a.png": (0, (255, 0, 0)),
    "train/n01/b.png": (0, (0, 255, 0)),
    "train/n02/c.png": (1, (0, 0, 255)),
    "my photos/d e.png": (2, (9, 99, 199)),
}


def _save(path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 4, 3), colour, dtype=np.uint8)).save(path)


@pytest.fixture
def root(tmp_path):
    for rel, (_, colour) in IMAGES.items():
        _save(tmp_path / "images" / rel, colour)
    return tmp_path / "images"


def _write(tmp_path, text: str, name: str = "list.txt"):
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def _good_list(tmp_path):
    # A blank line, a Windows line ending, a tab separator and trailing spaces, as hand-edited lists have.
    return _write(tmp_path,
                  "train/n01/a.png 0\n\ntrain/n01/b.png 0\r\ntrain/n02/c.png\t1\nmy photos/d e.png 2  \n")


def test_rows_labels_and_paths_with_spaces(tmp_path, root):
    ds = load_split_list(_good_list(tmp_path), root, num_classes=3)
    assert ds.column_names == ["image", "label"]
    assert ds["label"][:] == [0, 0, 1, 2]
    assert ds.features["label"] == datasets.ClassLabel(num_classes=3)
    assert isinstance(ds.features["image"], datasets.Image)
    for row, (label, colour) in zip(ds, IMAGES.values(), strict=True):
        assert row["label"] == label
        assert row["image"].size == (4, 6)
        assert row["image"].convert("RGB").getpixel((0, 0)) == colour
    assert class_counts(ds) == [2, 1, 1]


def test_images_are_stored_as_paths_and_decoded_on_access(tmp_path, root):
    ds = load_split_list(_good_list(tmp_path), root)
    stored = ds.cast_column("image", datasets.Image(decode=False))["image"][:]
    assert stored == [{"bytes": None, "path": str(root / rel)} for rel in IMAGES]
    # Rewriting a file after loading changes what a read returns: nothing was decoded or copied at load time.
    _save(root / "train/n01/a.png", (1, 2, 3))
    assert ds[0]["image"].convert("RGB").getpixel((0, 0)) == (1, 2, 3)


def test_label_feature_follows_what_is_known(tmp_path, root):
    lst = _good_list(tmp_path)
    assert load_split_list(lst, root).features["label"] == datasets.Value("int64")
    named = load_split_list(lst, root, class_names=["cat", "dog", "fish"])
    assert named.features["label"].names == ["cat", "dog", "fish"]
    assert named.features["label"].int2str(2) == "fish"
    with pytest.raises(ValueError, match="num_classes=4 but 3 class_names"):
        load_split_list(lst, root, num_classes=4, class_names=["cat", "dog", "fish"])


def test_relative_data_root_is_resolved_once(tmp_path, root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = load_split_list(_good_list(tmp_path), "images")
    monkeypatch.chdir(root / "train")
    assert ds[3]["image"].convert("RGB").getpixel((0, 0)) == (9, 99, 199)


@pytest.mark.parametrize("bad_line", ["train/n01/b.png", "train/n01/b.png one", "train/n01/b.png 1.0", "7"])
def test_malformed_line_names_file_and_line(tmp_path, root, bad_line):
    lst = _write(tmp_path, f"train/n01/a.png 0\n\n{bad_line}\ntrain/n02/c.png 1\n")
    expected = rf"list\.txt, line 3: expected 'relative/path label' .* got '{bad_line}'"
    with pytest.raises(ValueError, match=expected):
        load_split_list(lst, root)


def test_label_out_of_range(tmp_path, root):
    lst = _write(tmp_path, "train/n01/a.png 0\ntrain/n01/b.png 3\ntrain/n02/c.png 5\n")
    with pytest.raises(ValueError, match=r"line 2: label 3 is outside \[0, 2\] \(2 such lines\)\.$"):
        load_split_list(lst, root, num_classes=3)
    with pytest.raises(ValueError, match=r"line 3: label 5 is outside \[0, 3\] \(1 such lines\)"):
        load_split_list(lst, root, class_names=["a", "b", "c", "d"])
    open_set = _write(tmp_path, "train/n01/a.png 0\ntrain/n02/c.png -1\n", "open.txt")
    with pytest.raises(ValueError, match=r"open\.txt, line 2: label -1 is outside the class indices >= 0 "
                                         r"\(1 such lines\)\. A label of -1 marks an open-set image"):
        load_split_list(open_set, root)


def test_missing_images_name_the_first_and_the_count(tmp_path, root):
    lst = _write(tmp_path, "train/n01/a.png 0\nval/x.png 1\ntrain/n02/c.png 1\nval/y.png 2\n")
    with pytest.raises(FileNotFoundError,
                       match=rf"2 of the 4 images listed in .*list\.txt are missing; the first is "
                             rf"{root}{os.sep}val{os.sep}x\.png \(line 2\)\. data_root must be the folder"):
        load_split_list(lst, root)
    with pytest.raises(FileNotFoundError, match=r"data_root .*nowhere is not a directory"):
        load_split_list(lst, tmp_path / "nowhere")


def test_empty_list(tmp_path, root):
    with pytest.raises(ValueError, match="lists no images"):
        load_split_list(_write(tmp_path, "\n\n"), root)
