"""Train a tiny ViT on synthetic images (run by test_train.py, alone or under torchrun)."""

import sys

import torch

from quickmerge import distributed
from quickmerge.vision.train import Recipe, train

CONFIG = {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 16, "depth": 1,
          "num_heads": 2, "mlp_ratio": 2.0}


def synthetic(seed: int, n: int = 96):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8), torch.randint(0, 10, (n,),
                                                                                                generator=gen)


if __name__ == "__main__":
    torch.set_num_threads(1)
    ctx = distributed.setup()
    # 128 training images: one batch of the distillation teacher, which rank 0 trains and shares
    data = (synthetic(0, 128), synthetic(1))
    recipe = Recipe(epochs=2, batch_size=16, lr=1e-3, warmup_steps=2, ema_decay=0.9, teacher_epochs=1)
    train(sys.argv[1], recipe=recipe, config=CONFIG, ctx=ctx, data=data, test=synthetic(2), fresh=True)
    ctx.close()
