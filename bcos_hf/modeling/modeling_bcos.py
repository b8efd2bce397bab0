"""B-cos models on the transformers Auto classes: ``BcosModel`` and ``BcosForImageClassification``.

A B-cos model holds its source architecture (``self.network``: a ``ViTForImageClassification``, a
``ConvNextModel``, ...) rebuilt from ``config.source_config`` and rewritten layer by layer by the
architecture's adapter. The same rewriting runs at conversion and at every load, so a saved model reloads
bit-exactly, and a folder saved by bcos_hf carries this file and its siblings so that it also loads with
``trust_remote_code=True`` where bcos_hf is not installed.

Part of the remote-loadable model code: imports only torch, transformers and siblings, with single dots.
"""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager
from typing import ClassVar

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils.generic import can_return_tuple

from .adapters import get_adapter
from .bcos_layers import LogitLayer
from .configuration_bcos import BcosConfig
from .explainable import explanation_mode
from .explanation_bcos import BcosExplanation, Compile, Target, explain
from .rewriting import RewriteOptions, bcosify

PIXEL_RANGE_TOLERANCE = 1e-3
"""Slack on the [0, 1] input range, for resampling filters that overshoot by a rounding error."""

INCOMPLETE_MARKER = "WRITE_IN_PROGRESS"
"""File bcos_hf keeps in a folder while writing it (see ``bcos_hf.guards.atomic_folder``): a folder holding it
is an interrupted write and does not load."""


def check_pixel_values(pixel_values: torch.Tensor | None) -> None:
    """Raise a ValueError that says how to fix it when ``pixel_values`` break the B-cos input contract.

    Expected: a float tensor (batch, 3 or 6, height, width) with values in [0, 1]: RGB images scaled to
    [0, 1] *without* mean/std normalisation (it is folded into the first layer), or their ``[x, 1 - x]``
    encoding. Shape checks are static; the value check is one min/max reduction, skipped while
    ``torch.compile`` traces so that it never breaks a graph.
    """
    if pixel_values is None:
        raise ValueError("pixel_values is required: a float tensor (batch, 3, height, width) with values in [0, 1].")
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor; got {type(pixel_values).__name__}.")
    if pixel_values.ndim != 4:
        hint = " For a single image add a batch dimension: pixel_values[None]." if pixel_values.ndim == 3 else ""
        raise ValueError(
            f"pixel_values must have 4 dimensions (batch, channels, height, width); got shape "
            f"{tuple(pixel_values.shape)}.{hint}"
        )
    channels = pixel_values.shape[1]
    if channels not in (3, 6):
        hint = (
            " The images look channels-last: use pixel_values.permute(0, 3, 1, 2)."
            if pixel_values.shape[-1] in (3, 6)
            else " Convert grey or RGBA images to RGB first (PIL: image.convert('RGB'))."
        )
        raise ValueError(
            f"pixel_values must have 3 channels (RGB in [0, 1]; the model encodes [x, 1 - x] itself) or 6 "
            f"(already encoded); got {channels} channels in shape {tuple(pixel_values.shape)}.{hint}"
        )
    if pixel_values.shape[0] == 0:
        raise ValueError(f"pixel_values holds no images (shape {tuple(pixel_values.shape)}): pass at least one.")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be a floating-point tensor with values in [0, 1]; got dtype {pixel_values.dtype}. "
            "Scale uint8 images with pixel_values.float() / 255, or use the model's image processor."
        )
    if torch.compiler.is_compiling():
        return
    values = pixel_values.detach()
    low, high = torch.stack(torch.aminmax(values)).float().tolist()  # one device sync
    if low >= -PIXEL_RANGE_TOLERANCE and high <= 1 + PIXEL_RANGE_TOLERANCE:
        if channels == 6:
            _check_encoding(values)
        return
    if not torch.isfinite(pixel_values).all():
        raise ValueError("pixel_values contain NaN or Inf; check the image loading and preprocessing.")
    raise ValueError(
        f"pixel_values must lie in [0, 1]; got values from {low:.3g} to {high:.3g}. B-cos models take images "
        "scaled to [0, 1] without mean/std normalisation (it is folded into the first layer). Use the image "
        "processor saved with the model (AutoImageProcessor.from_pretrained(<model folder>)), or undo the "
        "normalisation: pixel_values * std + mean."
    )


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` that hold a NaN or an infinity."""
    tensors = [
        (name, t)
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if t.is_floating_point() and t.device.type != "meta"
    ]
    if not tensors:
        return []
    local = [(t.to_local() if hasattr(t, "to_local") else t).detach() for _, t in tensors]  # DTensor: its shard
    norms = torch._foreach_norm(local)  # one pass; a norm is finite exactly when its tensor is (barring overflow)
    finite = torch.isfinite(torch.stack([norm.float().to(norms[0].device) for norm in norms])).tolist()
    return [
        name for (name, _), tensor, ok in zip(tensors, local, finite, strict=True) if not ok and not _finite(tensor)
    ]


def _finite(tensor: torch.Tensor) -> bool:
    """Element-wise check, for the rare finite tensor whose norm overflows."""
    return bool(torch.isfinite(tensor.detach()).all())


def _backbone_prefix(info: dict) -> str | None:
    """The attribute under which a classifier checkpoint holds the backbone's missing weights (``vit`` for
    ``network.vit.*``), when every missing ``network.X`` is there; else None."""
    missing = {key for key in info.get("missing_keys") or [] if key.startswith("network.")}
    unexpected = set(info.get("unexpected_keys") or [])
    prefixes = {key.split(".")[1] for key in unexpected if key.startswith("network.") and key.count(".") > 2}
    for prefix in sorted(prefixes):
        moved = {
            "network." + key[len(f"network.{prefix}.") :] for key in unexpected if key.startswith(f"network.{prefix}.")
        }
        if missing & moved and not missing - moved - _pooler(missing):
            return prefix
    return None


def _pooler(keys: set[str]) -> set[str]:
    return {key for key in keys if key.startswith("network.pooler.")}


def _check_encoding(values: torch.Tensor) -> None:
    """Six channels must be ``[x, 1 - x]``: other pairs make explanations miss the logit (the encoding's two
    halves are what turns the biases' constant term into an input-linear one)."""
    gap = float((values[:, :3].float() + values[:, 3:].float() - 1).abs().max())
    tolerance = max(1e-4, 2 * torch.finfo(values.dtype).eps)
    if gap > tolerance:
        raise ValueError(
            f"6-channel pixel_values must be the encoding [x, 1 - x] of RGB images x in [0, 1]; channels 3-5 "
            f"differ from 1 - channels 0-2 by up to {gap:.3g}. Pass the 3-channel images instead: the model "
            "encodes them itself."
        )


def source_network_class(config: BcosConfig, task: str) -> type[PreTrainedModel]:
    """The transformers class the B-cos model wraps for ``task`` (the recorded variant, e.g. distilled DeiT)."""
    adapter = get_adapter(config.source_config.model_type)
    return getattr(transformers, adapter.source_class(task, config.source_architecture))


def build_network(config: BcosConfig, network_class: type[PreTrainedModel]) -> PreTrainedModel:
    """Build the source architecture from ``config.source_config`` and rewrite it the way the converter did."""
    adapter = get_adapter(config.source_config.model_type)
    network = network_class(config.source_config)
    options = RewriteOptions(
        b=config.b, keep_bias=config.keep_bias, normalize_weights=config.normalize_weights, adapter=adapter
    )
    return bcosify(network, adapter, options)


class BcosPreTrainedModel(PreTrainedModel):
    """Shared plumbing of B-cos models: the rewritten source network, the input contract and explanation mode."""

    config: BcosConfig
    config_class = BcosConfig
    base_model_prefix = "bcos"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    task: ClassVar[str]
    """The key of the adapter's ``model_classes`` this model wraps."""

    def __init__(self, config: BcosConfig, network: PreTrainedModel | None = None) -> None:
        """``network`` is given by the converter (an already rewritten source model); loading builds it."""
        super().__init__(config)
        # The config setter hands attention choices down to sub-configs, except at init: do it here, so the
        # source network dispatches to the attention kernel that was checked for this model. Architectures
        # without attention (ConvNeXt, ResNet, MobileNetV2) refuse every kernel choice: they keep their default.
        network_class = source_network_class(config, self.task)
        if network_class._supports_sdpa:
            config.source_config._attn_implementation = config._attn_implementation
        if network is None:
            network = build_network(config, network_class)
        else:
            for module in network.modules():
                module._is_hf_initialized = True  # converted weights: post_init must not re-initialise them
        self.network = network

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load as transformers does, but refuse what would give a silently wrong model: a folder left by an
        interrupted write, weights missing from the checkpoint (transformers would initialise them randomly,
        e.g. a backbone folder loaded as a classifier) and NaN or infinite weights."""
        folder = str(pretrained_model_name_or_path)
        if os.path.isfile(os.path.join(folder, INCOMPLETE_MARKER)):
            raise OSError(
                f"{folder} is an interrupted write (it still holds {INCOMPLETE_MARKER}): its files are incomplete. "
                "Delete it and convert (or save) again."
            )
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        prefix = _backbone_prefix(info) if cls.task == "base" and "key_mapping" not in kwargs else None
        if prefix is not None:  # a classifier's folder loaded as a backbone: its backbone, as transformers does
            mapping = {rf"^network\.{re.escape(prefix)}\.": "network."}
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, key_mapping=mapping, **kwargs
            )
            if info.get("missing_keys") and all(key.startswith("network.pooler.") for key in info["missing_keys"]):
                model.network.pooler = None  # the classifier has no pooler: its backbone has none either
                info["missing_keys"] = set()
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            recorded = ", ".join(model.config.architectures or []) or "unknown"
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(
                f"{folder} lacks {len(missing)} weights of a {cls.__name__} ({shown}): they would be random. The "
                f"folder holds a {recorded}: load it with that class (a backbone, BcosModel, with AutoModel; a "
                "classifier with AutoModelForImageClassification), or convert the checkpoint again if files are "
                "missing."
            )
        broken = non_finite_parameters(model)
        if broken:
            raise ValueError(
                f"{folder} holds NaN or infinite weights ({', '.join(broken[:5])}"
                f"{', ...' if len(broken) > 5 else ''}): the model would output NaN. Use an earlier checkpoint."
            )
        return (model, info) if wants_info else model

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to do: the network's modules are initialised by the source architecture's own rules."""

    def get_input_embeddings(self) -> nn.Module | None:
        """The source network's input embeddings (its patch embedding), or None for architectures without.

        Accelerate asks for them when it wraps a model with FSDP2.
        """
        try:
            return self.network.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            return None

    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Check the input contract and return the 6-channel ``[x, 1 - x]`` encoding in the model's dtype."""
        check_pixel_values(pixel_values)
        pixel_values = pixel_values.to(self.dtype)
        if pixel_values.shape[1] == 3:
            pixel_values = torch.cat([pixel_values, 1 - pixel_values], dim=1)
        return pixel_values

    def explanation_mode(self, enabled: bool = True) -> AbstractContextManager[nn.Module]:
        """Context manager: inside it, the input gradient of an output is the dynamic linear map W(x)."""
        return explanation_mode(self, enabled)

    def explain(
        self, pixel_values: torch.Tensor, target: Target = None, compile: Compile = False, **kwargs
    ) -> BcosExplanation:
        """Explain a batch in one forward and one backward: ``W(x)``, the contribution maps and their pictures.

        ``target``: None (the predicted class), a class index or label name for all images, or one per image.
        Backbones (``BcosModel``) have no classes: ``target`` is a feature index into ``pooler_output``, or a
        callable mapping the outputs to one score per image. ``compile``: run the forward under
        ``torch.compile(fullgraph=True)`` (True: inductor; or a backend name), worth it for repeated batches of
        one size. ``kwargs`` go to ``forward``. The model is left as it was (training flag, explanation mode,
        no gradients). See ``BcosExplanation``.
        """
        return explain(self, pixel_values, target, compile=compile, **kwargs)


class BcosModel(BcosPreTrainedModel):
    """A B-cos backbone (from ``ViTModel``, ``ConvNextModel``, ...): returns the source model's outputs."""

    task = "base"

    def __init__(self, config: BcosConfig, network: PreTrainedModel | None = None) -> None:
        super().__init__(config, network)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor | None = None, **kwargs):
        r"""
        pixel_values (`torch.Tensor` of shape `(batch, 3 or 6, height, width)`):
            Images in [0, 1] without mean/std normalisation, or their `[x, 1 - x]` encoding.
        kwargs: passed to the source model (e.g. `output_hidden_states`, `interpolate_pos_encoding`).
        """
        return self.network(pixel_values=self.encode_pixels(pixel_values), **kwargs)


class BcosForImageClassification(BcosPreTrainedModel):
    """A B-cos image classifier: the source classifier's logits through the logit layer."""

    task = "image-classification"
    accepts_loss_kwargs = False

    def __init__(self, config: BcosConfig, network: PreTrainedModel | None = None) -> None:
        super().__init__(config, network)
        self.logit_layer = LogitLayer(config.logit_bias, config.logit_temperature)
        self.post_init()

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs
    ) -> ImageClassifierOutput:
        r"""
        pixel_values (`torch.Tensor` of shape `(batch, 3 or 6, height, width)`):
            Images in [0, 1] without mean/std normalisation, or their `[x, 1 - x]` encoding.
        labels (`torch.LongTensor` of shape `(batch,)`, *optional*):
            Class indices for the classification loss (cross-entropy, or as `config.problem_type` says).
        kwargs: passed to the source model (e.g. `output_hidden_states`, `interpolate_pos_encoding`).
        """
        outputs = self.network(pixel_values=self.encode_pixels(pixel_values), **kwargs)
        logits = self.logit_layer(outputs.logits)
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )


BcosConfig.register_for_auto_class()
BcosModel.register_for_auto_class("AutoModel")
BcosForImageClassification.register_for_auto_class("AutoModelForImageClassification")
