"""The multimodal model family's training parts: interleaved image-text batches, and evaluation
by modality, captioning and image generation.

The model is ``model:`` with ``family: multimodal`` (:class:`~lmforge.nn.multimodal.MultimodalModelConfig`:
the Transformer, dense or MoE, over text + image tokens). The data must be prepared with the
``image_tokenizer`` step (data/image_steps.py); the run copies its codebook size into
``model.multimodal.codebook_size`` so the resolved config rebuilds the model. Batches come from
:class:`~lmforge.data.interleaved.InterleavedLoader`. The held-out evaluator (``heldout_eval``,
replacing the default) adds to the usual caption-text bits-per-byte: loss and bits per token of
text and of image tokens, MoE expert load per modality, caption accuracy (``eval_multimodal``
records in metrics.jsonl), and at the end image generation scored by a held-out classifier
(``eval/multimodal.json``, ``eval/multimodal_samples.png``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from lmforge.core.errors import ConfigError
from lmforge.core.io import atomic_write_bytes, atomic_write_json
from lmforge.core.logging import get_logger
from lmforge.core.metrics_file import append_metrics
from lmforge.data.image_tokenizer import IMAGE_TOKENIZER_FILE, ImageTokenizer, ImageTokenLayout
from lmforge.data.interleaved import ImageTextExamples, InterleavedLoader
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.image_config import IMAGE_SOURCE_KINDS, ImageSourceConfig
from lmforge.data.patch_sequences import PatchExamples, PatchSequenceLoader
from lmforge.eval.captions import (confusion_lines, generate_images, image_grid_png, pixel_classifier,
                                   score_generated, training_copies)
from lmforge.eval.multimodal import multimodal_evaluation, split_examples
from lmforge.nn.families import family_of
from lmforge.nn.multimodal import MultimodalModelConfig, MultimodalSettings
from lmforge.train.callbacks import HeldoutEvaluator
from lmforge.train.checkpoint import unwrap
from lmforge.train.families import TRAINING_FAMILIES, FamilyParts, ModelBatches, RunSetup, TrainingFamily

if TYPE_CHECKING:
    from lmforge.train.config import RunConfig
    from lmforge.train.trainer import Trainer

log = get_logger(__name__)


def generation_evaluation(model: torch.nn.Module, heldout: ImageTextExamples, tokenizer: Tokenizer,
                          image_tokenizer: ImageTokenizer, settings: MultimodalSettings, labels: list[str],
                          device: torch.device, seed: int,
                          training_codes: Any = None) -> tuple[dict[str, Any], bytes]:
    """Images generated from each label's caption, scored by a classifier fitted on held-out pixels;
    with ``training_codes``, also the share of them that copy a training image exactly."""
    labelled = [i for i, label in enumerate(heldout.labels) if label is not None]
    classifier, own_accuracy = pixel_classifier(heldout.pixels[labelled], [heldout.labels[i] for i in labelled])
    generated = generate_images(model, tokenizer, heldout.layout, image_tokenizer, settings.caption_template, labels,
                                settings.images_per_label, device, settings.generation_temperature,
                                settings.generation_top_k, seed)
    scored = score_generated(classifier, generated)
    if training_codes is not None and len(training_codes):
        scored.update(training_copies(generated, image_tokenizer.decode(training_codes)))
    scored.update(classifier="logistic regression on held-out pixels", classifier_heldout_images=len(labelled),
                  classifier_cross_validated_accuracy=own_accuracy, temperature=settings.generation_temperature,
                  top_k=settings.generation_top_k, prompt_template=settings.caption_template)
    return scored, image_grid_png(generated)


class MultimodalEvaluator(HeldoutEvaluator):
    """The default held-out evaluation (bits-per-byte of the caption text) plus the multimodal one."""

    def __init__(self, heldout: ImageTextExamples | PatchExamples, image_tokenizer: ImageTokenizer | None,
                 settings: MultimodalSettings, training_codes: Any = None):
        super().__init__()
        self.heldout, self.image_tokenizer, self.settings = heldout, image_tokenizer, settings
        self.training_codes = training_codes  # to count generated copies of training images

    def _evaluate(self, trainer: "Trainer") -> dict[str, Any]:
        record = super()._evaluate(trainer)
        if not trainer.is_main:
            return record
        result = multimodal_evaluation(unwrap(trainer.model), self.heldout, trainer.tokenizer, self.settings,
                                       trainer.device, self.settings.eval_max_images or None)
        extra = {"kind": "eval_multimodal", "step": trainer.step, "tokens": trainer.tokens,
                 **{k: v for k, v in result.items() if k != "captions"}}
        if "captions" in result:
            extra["caption_confusion"] = result["captions"]["confusion"]
            extra["caption_labels"] = result["captions"]["labels"]
        append_metrics(trainer.run_dir / "metrics.jsonl", extra)
        image_bits = result["bits_per_token_image"]
        log.info("step %d held-out bits/token: text %.3f, caption after image %.3f, image %s%s%s", trainer.step,
                 result["bits_per_token_text"], result["bits_per_token_caption"],
                 "n/a" if image_bits is None else f"{image_bits:.3f}",
                 f"; caption accuracy {result['caption_accuracy']:.3f} on {result['captions']['images']} images"
                 if "captions" in result else "",
                 f"; expert load text {result['moe_expert_load'].get('text')} image {result['moe_expert_load'].get('image')}"
                 if "moe_expert_load" in result else "")
        record["multimodal"] = extra
        return record

    def on_train_end(self, trainer: "Trainer") -> None:
        super().on_train_end(trainer)
        if not trainer.is_main:
            return
        model = unwrap(trainer.model)
        result = multimodal_evaluation(model, self.heldout, trainer.tokenizer, self.settings, trainer.device, None)
        labels = result.get("captions", {}).get("labels", [])
        if self.image_tokenizer is None:
            log.info("image generation does not apply to route %r (images are read, never predicted); "
                     "only the discrete route writes images", self.settings.route)
        elif labels and self.settings.images_per_label:
            result["generation"], png = generation_evaluation(model, self.heldout, trainer.tokenizer,
                                                              self.image_tokenizer, self.settings, labels,
                                                              trainer.device, trainer.cfg.eval.seed,
                                                              self.training_codes)
            atomic_write_bytes(trainer.run_dir / "eval" / "multimodal_samples.png", png)
            log.info("generated images classified as their prompt's label: %.3f (%d images; the held-out "
                     "classifier's own cross-validated accuracy %.3f); copies of a training image: %s",
                     result["generation"]["accuracy"], result["generation"]["images"],
                     result["generation"]["classifier_cross_validated_accuracy"],
                     f"{result['generation']['copied_training_fraction']:.3f}"
                     if "copied_training_fraction" in result["generation"] else "n/a")
        if "captions" in result:
            log.info("caption accuracy %.3f on %d held-out images; confusion (rows true, columns predicted):",
                     result["caption_accuracy"], result["captions"]["images"])
            for line in confusion_lines(result["captions"]):
                log.info("  %s", line)
        # Training compute by the family's counting (decoder + patch projection / image encoder).
        result.update(step=trainer.step, tokens=trainer.tokens, flops_per_token=trainer.flops_per_token,
                      training_flops=trainer.flops_per_token * trainer.tokens,
                      parameters=family_of(trainer.cfg.model).count_parameters(trainer.cfg.model).total)
        if self.image_tokenizer is not None:
            result["image_tokenizer"] = {
                "codebook_size": self.image_tokenizer.codebook_size, "patch_size": self.image_tokenizer.patch_size,
                "tokens_per_image": self.image_tokenizer.tokens_per_image,
                "reconstruction_error_heldout": self.image_tokenizer.reconstruction_error(self.heldout.pixels)
                if len(self.heldout) else None}
        atomic_write_json(trainer.run_dir / "eval" / "multimodal.json", result)


def _check_run(cfg: "RunConfig") -> None:
    if cfg.retrieval is not None:
        raise ConfigError("retrieval: only a model of family 'retro' reads a database (model.family is 'multimodal')")
    if "image_tokenizer" not in cfg.data.steps or cfg.data.image_tokenizer is None:
        raise ConfigError("data.steps: a multimodal model needs image data; add 'image_tokenizer' to the steps "
                          "(before 'tokenizer') and image sources (kind demo_digits, image_folder, image_parquet, "
                          "image_hf)")
    assert isinstance(cfg.model, MultimodalModelConfig)
    if cfg.model.multimodal.route != "discrete":
        _check_patch_route(cfg)
        return
    # The codebook trained by the data pipeline decides the image vocabulary; recorded in the
    # resolved config so a checkpoint rebuilds the same model.
    size = cfg.data.image_tokenizer.codebook_size
    if cfg.model.multimodal.codebook_size != size:
        cfg.model = dataclasses.replace(cfg.model, multimodal=dataclasses.replace(cfg.model.multimodal,
                                                                                  codebook_size=size))


def _check_patch_route(cfg: "RunConfig") -> None:
    """Continuous / encoder routes: the image geometry (from the image sources) is recorded in the
    resolved config, so a checkpoint rebuilds the same patch projection / encoder."""
    assert isinstance(cfg.model, MultimodalModelConfig)
    route = cfg.model.multimodal.route
    if cfg.train.context_parallel > 1:
        raise ConfigError(f"train.context_parallel: route {route!r} of the multimodal family runs whole sequences "
                          "(set train.context_parallel: 1)")
    shapes = {(tuple((s.image or ImageSourceConfig()).size), (s.image or ImageSourceConfig()).mode)
              for s in cfg.data.sources if s.kind in IMAGE_SOURCE_KINDS}
    if len(shapes) != 1:
        raise ConfigError(f"data.sources: route {route!r} needs image sources of one size and mode, got "
                          f"{sorted(shapes) or 'none'}")
    (size, mode), = shapes
    settings = dataclasses.replace(cfg.model.multimodal, image_size=list(size), image_channels=3 if mode == "RGB" else 1)
    cfg.model = dataclasses.replace(cfg.model, multimodal=settings)


def _build(setup: RunSetup, model: torch.nn.Module) -> FamilyParts:
    cfg = setup.cfg
    assert isinstance(cfg.model, MultimodalModelConfig)
    if cfg.model.multimodal.route != "discrete":
        return _build_patch_route(setup)
    image_tokenizer = ImageTokenizer.load(setup.data_dir / IMAGE_TOKENIZER_FILE)
    if image_tokenizer.codebook_size != cfg.model.multimodal.codebook_size:
        raise ConfigError(f"model.multimodal.codebook_size ({cfg.model.multimodal.codebook_size}) differs from "
                          f"{setup.data_dir / IMAGE_TOKENIZER_FILE} ({image_tokenizer.codebook_size} entries)")
    layout = ImageTokenLayout(setup.tokenizer.vocab_size, image_tokenizer.codebook_size)
    train = ImageTextExamples(setup.data_dir, "train", setup.tokenizer, layout)
    heldout = ImageTextExamples(setup.data_dir, "heldout", setup.tokenizer, layout)
    settings = cfg.model.multimodal
    loader = InterleavedLoader(train, cfg.train.seq_len, setup.local_batch_size, cfg.train.seed,
                               settings.text_first_fraction, setup.rank, setup.world_size,
                               augment_shift=settings.augment_shift, image_tokenizer=image_tokenizer,
                               image_loss_weight=settings.image_loss_weight)
    description = (f"multimodal: {len(train)} training / {len(heldout)} held-out images, {image_tokenizer.tokens_per_image} "
                   f"tokens each from a {image_tokenizer.codebook_size}-entry codebook; vocabulary {layout.text_vocab} text "
                   f"+ 2 + {layout.codebook_size} image = {layout.total}")
    evaluator = MultimodalEvaluator(heldout, image_tokenizer, settings, training_codes=train.codes)
    return FamilyParts(ModelBatches(loader), {"heldout_eval": evaluator}, description)


def _build_patch_route(setup: RunSetup) -> FamilyParts:
    cfg = setup.cfg
    assert isinstance(cfg.model, MultimodalModelConfig)
    settings = cfg.model.multimodal
    train = split_examples(cfg.model, setup.data_dir, "train", setup.tokenizer)
    heldout = split_examples(cfg.model, setup.data_dir, "heldout", setup.tokenizer)
    assert isinstance(train, PatchExamples)
    if list(train.pixels.shape[1:3][::-1]) != settings.image_size:
        raise ConfigError(f"model.multimodal.image_size {settings.image_size} differs from the prepared images "
                          f"({train.pixels.shape[2]}x{train.pixels.shape[1]} in {setup.data_dir})")
    loader = PatchSequenceLoader(train, cfg.train.seq_len, setup.local_batch_size, cfg.train.seed,
                                 settings.examples_per_row, settings.text_first_fraction, setup.rank,
                                 setup.world_size, augment_shift=settings.augment_shift)
    rows, columns = train.grid
    side = (f"a linear projection of each {cfg.model.patch_dim}-value patch" if settings.route == "continuous" else
            f"an image encoder ({settings.encoder.n_layers} layers of width {settings.encoder.d_model}) then a "
            "projection")
    description = (f"multimodal, route {settings.route}: {len(train)} training / {len(heldout)} held-out images, "
                   f"{rows}x{columns} patches each (+{rows} row separators, begin/end-image) through {side}; "
                   f"{settings.examples_per_row} examples per row; loss on text tokens only")
    evaluator = MultimodalEvaluator(heldout, None, settings)
    return FamilyParts(ModelBatches(loader, ("images",)), {"heldout_eval": evaluator}, description)


TRAINING_FAMILIES.register("multimodal")(TrainingFamily("multimodal", build=_build, check_run=_check_run))
