"""Split-list files of the large long-tailed benchmarks as ``datasets.Dataset``.

ImageNet-LT and Places-LT (Liu et al., 2019), iNaturalist-2018 and the label-shifted test sets of LADE and
SADE (``ImageNet_LT_forward50.txt``, ``iNaturalist18_backward3.txt``, ...) are published as text files with
one ``relative/path label`` line per image; the images themselves are downloaded separately. ``datasets``
has no reader for this format (its ``imagefolder`` builder takes labels from directory names), hence the
few lines here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import datasets


def _parse(list_file: str | os.PathLike) -> tuple[list[str], list[int], list[int]]:
    """Relative paths, labels and line numbers of the non-blank lines of ``list_file``.

    The label is the last whitespace-separated field and the path everything before it, so paths with
    spaces read correctly (codebases that take ``line.split()[0]`` would cut them).
    """
    paths, labels, line_numbers = [], [], []
    with open(list_file, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            fields = line.rsplit(maxsplit=1)
            try:
                label = int(fields[1]) if len(fields) == 2 else None
            except ValueError:
                label = None
            if label is None:
                raise ValueError(
                    f"{list_file}, line {line_number}: expected 'relative/path label' with an integer label "
                    f"last, got {line!r}."
                )
            paths.append(fields[0])
            labels.append(label)
            line_numbers.append(line_number)
    if not paths:
        raise ValueError(f"{list_file} lists no images.")
    return paths, labels, line_numbers


def _label_feature(num_classes: int | None,
                   class_names: Sequence[str] | None) -> datasets.ClassLabel | datasets.Value:
    if class_names is not None:
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(f"num_classes={num_classes} but {len(class_names)} class_names were given.")
        return datasets.ClassLabel(names=list(class_names))
    if num_classes is not None:
        return datasets.ClassLabel(num_classes=num_classes)
    return datasets.Value("int64")


def _check_labels(labels: list[int], line_numbers: list[int], num_classes: int | None,
                  list_file: str | os.PathLike) -> None:
    upper = num_classes if num_classes is not None else float("inf")
    bad = [i for i, label in enumerate(labels) if not 0 <= label < upper]
    if not bad:
        return
    valid = f"[0, {num_classes - 1}]" if num_classes is not None else "the class indices >= 0"
    first = bad[0]
    open_set = (" A label of -1 marks an open-set image (as in Places_LT_open.txt), which has no class to "
                "train or score against." if labels[first] == -1 else "")
    raise ValueError(
        f"{list_file}, line {line_numbers[first]}: label {labels[first]} is outside {valid} "
        f"({len(bad)} such lines).{open_set}"
    )


def load_split_list(list_file: str | os.PathLike, data_root: str | os.PathLike,
                    num_classes: int | None = None,
                    class_names: Sequence[str] | None = None) -> datasets.Dataset:
    """The images and labels a split-list file names, with columns ``image`` and ``label``.

    Each non-blank line of ``list_file`` is ``relative/path label``; paths are relative to ``data_root``
    (an absolute path in the list is kept as it is). ``image`` is a ``datasets.Image`` column holding only
    the paths, so images are decoded when a row is read, not here. ``label`` is a ``ClassLabel`` when
    ``num_classes`` or ``class_names`` is given (and labels are checked against it), else ``int64``.

    Raises ``ValueError`` for a malformed line or a label out of range (naming file and line) and
    ``FileNotFoundError`` when listed images are missing (naming the first and how many).
    """
    root = os.path.abspath(os.path.expanduser(data_root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data_root {root} is not a directory.")
    relative, labels, line_numbers = _parse(list_file)
    label_feature = _label_feature(num_classes, class_names)
    _check_labels(labels, line_numbers, len(class_names) if class_names is not None else num_classes,
                  list_file)
    paths = [os.path.join(root, path) for path in relative]
    missing = [i for i, path in enumerate(paths) if not os.path.isfile(path)]
    if missing:
        first = missing[0]
        raise FileNotFoundError(
            f"{len(missing)} of the {len(paths)} images listed in {list_file} are missing; the first is "
            f"{paths[first]} (line {line_numbers[first]}). data_root must be the folder that the listed "
            f"paths (such as {relative[first]!r}) are relative to."
        )
    features = datasets.Features({"image": datasets.Image(), "label": label_feature})
    return datasets.Dataset.from_dict({"image": paths, "label": labels}, features=features)
