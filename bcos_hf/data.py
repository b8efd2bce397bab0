"""Image datasets for B-cos training: loading, a collator giving ``pixel_values`` in [0, 1], accuracy.

B-cos models take RGB images in [0, 1] without mean/std normalisation (it is folded into the first layer), so
the collator runs the model's saved image processor with ``do_normalize=False`` and turns grey or RGBA
images into RGB. It works on any ``datasets.Dataset`` with an image column (``imagefolder``, saved Arrow
datasets, ``Dataset.from_dict``): the images are decoded and processed per batch in the collator, which is
why ``BcosTrainingArguments`` keeps ``remove_unused_columns=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

LABEL_COLUMNS = ("label", "labels")
IMAGE_COLUMNS = ("image", "img", "pixel_values")


def to_rgb(image) -> Image.Image:
    """A PIL RGB image from a PIL image of any mode (grey, RGBA, palette, 16-bit, float) or an (H, W[, C]) array.

    PIL's own conversion clips float ('F') images to 0..255 as they are, so images in [0, 1] would turn
    black: float images in [0, 1] are scaled by 255, float images in [0, 255] kept, 16-bit integer images
    above 255 divided by 257; anything else (negative, NaN, larger) is an error.
    """
    if isinstance(image, Image.Image) and image.mode in ("F", "I", "I;16", "I;16B", "I;16L", "I;16N"):
        image = _to_eight_bit(np.asarray(image), is_float=image.mode == "F")
    elif not isinstance(image, Image.Image):
        array = np.asarray(image)
        image = _to_eight_bit(array, array.dtype.kind == "f") if array.dtype != np.uint8 else Image.fromarray(array)
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_eight_bit(values: np.ndarray, is_float: bool) -> Image.Image:
    """8-bit image of a float or wide-integer array, by its range (see ``to_rgb``)."""
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("The image holds NaN or infinite values: check how it was made or decoded.")
    low, high = values.min(initial=0.0), values.max(initial=0.0)
    scales = ((1.0, 255.0), (255.0, 1.0)) if is_float else ((255.0, 1.0), (65535.0, 1 / 257))
    scale = next((factor for limit, factor in scales if high <= limit), None)
    if low < 0 or scale is None:
        raise ValueError(
            f"The image's values run from {low:g} to {high:g}; expected [0, 1] or [0, 255] (float images) or "
            "[0, 65535] (16-bit images). Rescale it, or save it as an 8-bit RGB image."
        )
    return Image.fromarray(np.round(values * scale).astype(np.uint8))


def _pick_column(columns, candidates: tuple[str, ...], wanted: str | None) -> str | None:
    if wanted is not None:
        return wanted if wanted in columns else None
    return next((name for name in candidates if name in columns), None)


def find_column(dataset, kind: str, wanted: str | None = None) -> str:
    """The image (``kind="image"``) or label (``"label"``) column of a ``datasets.Dataset``: ``wanted``, else the
    first usual name (``IMAGE_COLUMNS``, ``LABEL_COLUMNS``), else the first column of feature type ``Image`` or
    ``ClassLabel``; a ValueError naming the columns when there is none."""
    import datasets

    candidates, feature_type = {
        "image": (IMAGE_COLUMNS, datasets.Image),
        "label": (LABEL_COLUMNS, datasets.ClassLabel),
    }[kind]
    features = dataset.features
    column = _pick_column(list(features), candidates, wanted)
    if column is None and wanted is None:
        column = next((name for name, feature in features.items() if isinstance(feature, feature_type)), None)
    if column is None:
        raise ValueError(
            f"The dataset has no {kind} column (columns: {dict(features)}); expected "
            f"{wanted or ' or '.join(candidates) + f' or a {feature_type.__name__} feature'}. Rename yours with "
            "dataset.rename_column(<name>, ...)."
        )
    return column


def load_image_dataset(source: str | Path, split: str = "train"):
    """Load an image dataset from a local folder: a saved ``Dataset`` (``save_to_disk``), Arrow files, or class folders.

    A folder with ``dataset_info.json``/``state.json`` is loaded with ``load_from_disk`` (a ``DatasetDict``
    gives ``split``); a folder of ``*.arrow`` files with the ``arrow`` builder; anything else as an
    ``imagefolder`` (one sub-folder per class).
    """
    import datasets

    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: expected a saved dataset, Arrow files or class folders.")
    if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{folder} has no split {split!r}; it has {', '.join(loaded)}.")
            loaded = loaded[split]
        return loaded
    arrow_files = sorted(str(path) for path in folder.glob("*.arrow"))
    if arrow_files:
        return datasets.load_dataset("arrow", data_files={split: arrow_files}, split=split)
    return datasets.load_dataset("imagefolder", data_dir=str(folder), split=split)


def check_dataset_labels(dataset, config, split: str = "train_dataset", label_column: str | None = None) -> None:
    """Raise a ValueError saying how to fix it when ``dataset`` has no labels or labels that do not fit the model.

    Checked on ``datasets.Dataset`` objects (other datasets are left to the collator): a label column must
    exist, and a ``ClassLabel`` feature must have as many classes as the model, with the same names when the
    model's labels are named.
    """
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        return
    column = _pick_column(columns, LABEL_COLUMNS, label_column)
    if column is None:
        raise ValueError(
            f"The {split} has no label column (columns: {', '.join(columns)}; expected one of "
            f"{', '.join(LABEL_COLUMNS)}). Add the class index of each image as a 'label' column "
            "(dataset.add_column('label', ...)), rename yours (dataset.rename_column(<name>, 'label')), or for "
            "label-free distillation use a collator that returns no labels and pass teacher=..."
        )
    names = getattr(dataset.features[column], "names", None)
    if names is None:
        return
    model_names = [config.id2label[i] for i in sorted(config.id2label)] if config.id2label else []
    if len(names) != config.num_labels:
        raise ValueError(
            f"The {split} has {len(names)} classes ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) but "
            f"the model has {config.num_labels} labels. Give the model the dataset's labels before converting: "
            "load the source with from_pretrained(..., num_labels=N, id2label=..., label2id=..., "
            "ignore_mismatched_sizes=True) and pass it to bcos_hf.convert.convert (see "
            "examples/finetune_image_classification.py)."
        )
    generic = all(name == f"LABEL_{i}" for i, name in enumerate(model_names))
    if not generic and [str(name) for name in names] != [str(name) for name in model_names]:
        raise ValueError(
            f"The {split}'s class names {names} differ from the model's labels {model_names} (order matters: "
            "label i of the dataset trains logit i). Reorder the dataset's labels "
            "(dataset.align_labels_with_mapping({name: i for i, name in model.config.id2label.items()}, column)) "
            "or convert the source with the "
            "dataset's id2label."
        )


@dataclass
class ImageClassificationCollator:
    """Batch images and labels for a B-cos classifier: ``{"pixel_values": (N, 3, H, W) in [0, 1], "labels"}``.

    Args:
        image_processor: the model's saved image processor (``AutoImageProcessor.from_pretrained(model_dir)``);
            normalisation is switched off whatever it says, resizing and rescaling to [0, 1] are kept.
        image_column / label_column: column names; by default the first of ``image, img, pixel_values`` and
            ``label, labels`` that the examples have. Examples without labels give a batch without labels
            (label-free distillation).
        num_labels: if given, labels outside ``[0, num_labels)`` raise.
    """

    image_processor: object
    image_column: str | None = None
    label_column: str | None = None
    num_labels: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        keys = list(examples[0])
        image_column = _pick_column(keys, IMAGE_COLUMNS, self.image_column)
        if image_column is None:
            raise KeyError(
                f"The examples have no image column (keys: {', '.join(keys)}; expected "
                f"{self.image_column or ' or '.join(IMAGE_COLUMNS)}). If the Trainer removed it, keep "
                "remove_unused_columns=False (the BcosTrainingArguments default)."
            )
        images = [to_rgb(example[image_column]) for example in examples]
        pixel_values = self.image_processor(images, return_tensors="pt", do_normalize=False)["pixel_values"]
        batch = {"pixel_values": pixel_values.float()}
        label_column = _pick_column(keys, LABEL_COLUMNS, self.label_column)
        if label_column is not None:
            labels = torch.tensor([int(example[label_column]) for example in examples], dtype=torch.long)
            if self.num_labels is not None and (labels.min() < 0 or labels.max() >= self.num_labels):
                raise ValueError(
                    f"Labels must lie in [0, {self.num_labels}) for this model; got {labels.min()}..{labels.max()}."
                    " The dataset's label set does not match the model's: see check_dataset_labels."
                )
            batch["labels"] = labels
        return batch


def compute_accuracy(eval_prediction) -> dict[str, float]:
    """Top-1 accuracy for ``Trainer(compute_metrics=...)``, with numpy (no ``evaluate.load``: it needs the Hub)."""
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


class ImageDataset:
    """Images in [0, 1] at the model's input size, with the model's label ids, read in batches (for the
    explanation metrics).

    ``source``: a ``(images, labels)`` pair of tensors (N x 3 x H x W in [0, 1], N), a ``datasets.Dataset``
    (columns found by ``find_column``), or a folder (``load_image_dataset``). Datasets go through
    ``image_processor`` (the one saved with the B-cos model: no normalisation). When the dataset's class names are
    all among the model's labels (``id2label``), labels are matched by name (an imagefolder numbers its classes
    alphabetically). Otherwise, with ``require_model_labels`` (GridPG: every image must be scored for its own
    class), a class name the model does not have is an error unless the model's labels are generic
    (``LABEL_0``, ...); without it the dataset's label ids are kept and ``to_model_label`` stays None.
    """

    def __init__(
        self,
        source,
        image_processor=None,
        split: str = "train",
        id2label: dict | None = None,
        require_model_labels: bool = False,
    ) -> None:
        self.to_model_label: dict[int, int] | None = None
        if isinstance(source, tuple):
            self.images, self.labels = source
            self.dataset = None
            return
        if isinstance(source, (str, Path)):
            source = load_image_dataset(source, split)
        if image_processor is None:
            raise ValueError("A dataset of images needs the model's image_processor to resize them.")
        self.dataset, self.image_processor = source, image_processor
        self.image_column = find_column(source, "image")
        self.label_column = find_column(source, "label")
        names = getattr(source.features[self.label_column], "names", None) or []
        model_ids = {str(name): int(index) for index, name in (id2label or {}).items()}
        if names and all(name in model_ids for name in names):
            self.to_model_label = {index: model_ids[name] for index, name in enumerate(names)}
        elif require_model_labels and any(name != f"LABEL_{index}" for name, index in model_ids.items()):
            unknown = [name for name in names if name not in model_ids]
            raise ValueError(
                f"The dataset's classes {unknown[:5]}{' ...' if len(unknown) > 5 else ''} are not among the model's "
                f"labels {list(model_ids)[:10]}: name the dataset's classes (its class folders) after the model's "
                "labels, so that each image is scored for its own class."
            )
        if len(source) == 0:
            raise ValueError("The dataset holds no images.")

    def __len__(self) -> int:
        return len(self.labels) if self.dataset is None else len(self.dataset)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, 3, H, W), labels (B,)) for ``indices``."""
        indices = list(indices)
        if self.dataset is None:
            return self.images[indices].float(), torch.as_tensor(self.labels)[indices]
        rows = self.dataset[indices]
        images = [to_rgb(image) for image in rows[self.image_column]]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"].float()
        labels = rows[self.label_column]
        if self.to_model_label is not None:
            labels = [self.to_model_label[label] for label in labels]
        return pixel_values, torch.tensor(labels)
