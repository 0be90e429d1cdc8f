"""A learned saliency for merge-aware fine-tuning: one linear keep-score per block.

QuickMerge++'s differentiable merge passes gradients through its relaxed K-hot removal mask
(:func:`~quickmerge.vision.token_merge.relaxed_bipartite_merge`). With a :class:`TokenScorer`
patched in, each block adds ``w_l . LayerNorm(x_i)`` to token i's protection from being merged
away (the same place as the saliency-rank penalty), so the fine-tune learns which tokens to keep,
not only the keys that decide the matches. The weights start at zero: an untrained scorer
changes nothing. There is no bias: a score added to every token alike changes no merge (and the
relaxed mask, centred at the K-th score, gives it no gradient). Training mode, evaluation and the hard merge all use it.

    scorer = TokenScorer(num_layers=6, dim=128)
    quickmerge.patch(model, r=40, scorer=scorer)   # registered as model.quickmerge_scorer
    scorer.save(out_dir); TokenScorer.load(out_dir)  # token_scorer.safetensors beside the model
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._optional import require

FILENAME = "token_scorer.safetensors"
ATTRIBUTE = "quickmerge_scorer"  # the model's submodule while patched: optimisers, DDP and EMA see the scorer


class TokenScorer(nn.Module):
    """Per-block keep scores ``[B, m]`` of the mergeable tokens ``x [B, m, C]``: higher means kept."""

    def __init__(self, num_layers: int, dim: int) -> None:
        super().__init__()
        if num_layers < 1 or dim < 1:
            raise ValueError(f"TokenScorer needs num_layers >= 1 and dim >= 1, got {num_layers}, {dim}")
        self.weight = nn.Parameter(torch.zeros(num_layers, dim))

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, layer: int, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"TokenScorer was built for {self.dim} channels, got tokens of {x.shape[-1]}")
        h = F.layer_norm(x.float(), (self.dim,))  # the residual stream's scale grows with depth
        return h @ self.weight[layer].float()

    def save(self, directory: str | Path) -> Path:
        """Write ``token_scorer.safetensors`` into ``directory``; returns its path."""
        st = require("safetensors.torch", "vision", "Saving a token scorer")
        path = Path(directory) / FILENAME
        st.save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> TokenScorer:
        """The scorer saved in ``directory`` (a fine-tuned checkpoint written with ``--learned-saliency``)."""
        st = require("safetensors.torch", "vision", "Loading a token scorer")
        path = Path(directory) / FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no {FILENAME} in {directory}: the checkpoint was not fine-tuned with a "
                                    "learned saliency (train vision --finetune ... --learned-saliency)")
        tensors = st.load_file(str(path))
        scorer = cls(*tensors["weight"].shape)
        scorer.load_state_dict(tensors)
        return scorer

    @staticmethod
    def saved_in(directory: str | Path) -> bool:
        """Whether ``directory`` holds a saved scorer."""
        return (Path(directory) / FILENAME).is_file()
