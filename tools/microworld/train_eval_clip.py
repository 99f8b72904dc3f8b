#!/usr/bin/env python3
"""Train the micro-world's evaluation CLIP: a tiny Hugging Face ``CLIPModel`` (64 px pictures in
8 px patches, 2 layers per tower), contrastively on the world's picture-caption pairs, solid and
striped, so that CLIP-I, CLIP-T and drift scores mean something in this world.  Saved with
``save_pretrained`` plus CLIP's BPE files: the layout ``LipschitzEvalModelLoader`` loads.

    nice -n 5 .venv/bin/python tools/microworld/train_eval_clip.py --out tools/microworld/weights/microworld-clip

Pairs with the same caption in a batch are all positives (soft targets), since the world has
few captions.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from setup_comfyui import comfyui_root

from microworld import world

from pack_import import add_to_sys_path  # noqa: E402

add_to_sys_path()
from lipschitz_personalize.trainer.evaluation.encoders import CLIP_MEAN, CLIP_STD  # noqa: E402


def new_model() -> CLIPModel:
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=1, max_position_embeddings=77),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                           image_size=64, patch_size=8),
        projection_dim=64)
    return CLIPModel(config)


def batch_items(rng: np.random.Generator, n: int) -> list[world.Item]:
    items = world.base_items(rng, n // 2) + world.patterned_items(rng, n // 4)
    items += world.subject_items(int(rng.integers(1 << 30)), n - len(items) - n // 8)
    return items + [world.random_item(rng, world.SHAPES[int(rng.integers(3))],
                                      list(world.PATTERN_COLORS)[int(rng.integers(len(world.PATTERN_COLORS)))])
                    for _ in range(n - len(items))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pool", type=int, default=1024, help="pictures rendered once and drawn from")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok_dir = comfyui_root() / "comfy" / "sd1_tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    model = new_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rng = np.random.default_rng(0)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    items = batch_items(rng, args.pool)  # rendered once: drawing dominates a step of this tiny model
    pool_caps = [world.caption(it) for it in items]
    pool_px = (torch.from_numpy(world.render_batch(items)).permute(0, 3, 1, 2) - mean) / std
    t0 = time.time()
    for step in range(1, args.steps + 1):
        pick = rng.choice(len(items), size=args.batch, replace=False)
        caps = [pool_caps[i] for i in pick]
        px = pool_px[torch.from_numpy(pick)]
        tok = tokenizer(caps, padding=True, return_tensors="pt")
        img = F.normalize(model.visual_projection(model.vision_model(pixel_values=px).pooler_output), dim=-1)
        txt = F.normalize(model.text_projection(model.text_model(**tok).pooler_output), dim=-1)
        logits = img @ txt.T * model.logit_scale.exp()
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = (torch.sum(-target * logits.log_softmax(1), 1).mean() + torch.sum(-target * logits.T.log_softmax(1), 1).mean()) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == 1:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    model.eval().save_pretrained(args.out)
    for f in tok_dir.iterdir():
        shutil.copy(f, args.out / f.name)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
