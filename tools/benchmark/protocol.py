"""The DreamBooth benchmark's protocol as the paper evaluates it: subjects, prompts, seeds, drift prompts.

Read from the benchmark's own ``prompts_and_classes.txt`` (the subject -> class table and the
two 25-prompt lists, "Object Prompts" and "Live Subject Prompts") and its one folder of photos
per subject.  Live subjects (the dogs and cats) get the live list, every other subject the
object list, as in the DreamBooth paper.  Evaluation noise is keyed by (prompt, image) only, so
every subject and every lambda, and the base model, sample from the same initial latents.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

TOKEN = "sks"
LIVE_CLASSES = ("dog", "cat")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
INDEX = "prompts_and_classes.txt"


class ProtocolError(ValueError):
    """The benchmark folder is not in the DreamBooth layout; the message says what is missing."""


@dataclass(frozen=True)
class Subject:
    name: str
    class_name: str
    folder: Path

    @property
    def live(self) -> bool:
        return self.class_name in LIVE_CLASSES

    @property
    def instance_prompt(self) -> str:
        """The training prompt, as the paper's reference run writes it."""
        return f"a photo of {TOKEN} {self.class_name}"

    def photos(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)


@dataclass(frozen=True)
class Benchmark:
    root: Path
    subjects: dict[str, Subject]
    object_prompts: list[str]
    live_prompts: list[str]
    """Templates with ``{0}`` (the token) and ``{1}`` (the class word)."""

    def prompts(self, subject: Subject, count: int | None = None) -> list[str]:
        """The evaluation prompts of ``subject`` with the token and class filled in (the first
        ``count`` of the 25)."""
        templates = self.live_prompts if subject.live else self.object_prompts
        return [t.format(TOKEN, subject.class_name) for t in templates[:count]]


def read_benchmark(root: str | Path) -> Benchmark:
    """Parse ``root/prompts_and_classes.txt`` and check that every listed subject has photos."""
    root = Path(root).expanduser()
    index = root / INDEX
    if not index.is_file():
        raise ProtocolError(f"--data {root}: no {INDEX}; expected the DreamBooth benchmark's layout "
                            "(prompts_and_classes.txt and one folder of photos per subject)")
    text = index.read_text()
    classes = dict(re.findall(r"^([\w-]+),([^,\n]+)$", text.split("Prompts")[0], flags=re.MULTILINE))
    classes.pop("subject_name", None)
    lists = re.findall(r"^(Object|Live Subject) Prompts\s*\n(.*?)^\]", text, flags=re.MULTILINE | re.DOTALL)
    sections = {name: re.findall(r"'([^']*)'\.format", body) for name, body in lists}
    if not classes or set(sections) != {"Object", "Live Subject"}:
        raise ProtocolError(f"{index}: could not read the subject,class table and both prompt lists")
    subjects = {name: Subject(name, cls.strip(), root / name) for name, cls in classes.items()}
    missing = [s.name for s in subjects.values() if not s.folder.is_dir() or not s.photos()]
    if missing:
        raise ProtocolError(f"{root}: no photos for {', '.join(missing)}")
    return Benchmark(root, subjects, sections["Object"], sections["Live Subject"])


def select(benchmark: Benchmark, names: list[str] | None) -> list[Subject]:
    """The subjects to run, in the benchmark's order (all when ``names`` is empty)."""
    if not names:
        return list(benchmark.subjects.values())
    unknown = [n for n in names if n not in benchmark.subjects]
    if unknown:
        raise ProtocolError(f"--subjects: unknown {', '.join(unknown)}; the benchmark has "
                            f"{', '.join(benchmark.subjects)}")
    return [benchmark.subjects[n] for n in names]


def load_photos(paths: list[Path], size: int) -> torch.Tensor:
    """Photos as one batch [N, size, size, 3] in [0, 1]: the paper's plain resize (no crop)."""
    arrays = [torch.frombuffer(bytearray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC).tobytes()),
                               dtype=torch.uint8).reshape(size, size, 3) for p in paths]
    return torch.stack(arrays).float() / 255.0


def noise_seed(prompt_index: int, image_index: int) -> int:
    """The initial noise of image ``image_index`` of prompt ``prompt_index``: the same for every
    subject, every lambda and the base model."""
    return 1_000_003 * (prompt_index + 1) + image_index


def expand(prompts: list[str], images_per_prompt: int) -> tuple[list[str], list[int]]:
    """One (prompt, seed) pair per image to generate."""
    pairs = [(p, noise_seed(i, j)) for i, p in enumerate(prompts) for j in range(images_per_prompt)]
    return [p for p, _ in pairs], [s for _, s in pairs]


def drift_prompts(count: int, file: str | Path | None = None) -> list[str]:
    """Prompts without the token for the drift check: the first ``count`` lines of ``file``, or
    ``count`` ImageNet class names spread evenly over the 1000 classes (torchvision's list; no
    download)."""
    if file is not None:
        if not Path(file).is_file():
            raise ProtocolError(f"--drift-prompts {file}: no such file")
        lines = [line.strip() for line in Path(file).read_text().splitlines() if line.strip()]
        if not lines:
            raise ProtocolError(f"--drift-prompts {file}: no prompt in it (one prompt a line)")
        return lines[:count]
    from torchvision.models._meta import _IMAGENET_CATEGORIES as names

    step = max(1, len(names) // max(count, 1))
    return [f"a photo of a {n}" for n in names[::step][:count]]
