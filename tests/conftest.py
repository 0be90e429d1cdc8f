import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


# torch.compile's backend for tests whose point is tracing (no graph break under ``fullgraph=True``, guards that
# follow the handle) and whose numbers are compared with eager: dynamo, then AOTAutograd's functionalisation with
# inductor's decompositions and partitioner, without inductor's C++ code generation (a clean machine's empty
# inductor cache made each such test cost 16-48 s). Inductor itself compiles one timm and one Hugging Face model.
TRACING = "aot_eager_decomp_partition"


def naive_group_means(x: torch.Tensor, mass: torch.Tensor, assignment: torch.Tensor, k: int) -> torch.Tensor:
    """Reference weighted means with explicit loops (tests only)."""
    b, _, d = x.shape
    out = torch.zeros(b, k, d, dtype=torch.float64)
    for i in range(b):
        for g in range(k):
            members = assignment[i] == g
            w = mass[i][members].double()
            out[i, g] = (w[:, None] * x[i][members].double()).sum(0) / w.sum()
    return out


def tokens_on_grid(tokens: torch.Tensor, source: torch.Tensor, prefix: int, side: int) -> torch.Tensor:
    """Patch tokens ``[B, n, C]`` as a map ``[B, C, side, side]``, each patch the token the source map
    ``[B, prefix + side * side]`` (indices among all tokens) sends it to (tests only)."""
    index = (source[:, prefix:] - prefix)[..., None].expand(-1, -1, tokens.shape[-1])
    return tokens.gather(1, index).unflatten(1, (side, side)).permute(0, 3, 1, 2)


@pytest.fixture
def refused(capsys):
    """``refused(argv, pattern)``: ``quickmerge argv`` exits with status 2, its last line on stderr
    ``quickmerge <command>: error: ...`` matching the regular expression ``pattern``; returns that line."""
    import re

    from quickmerge.cli import main

    def check(argv: list[str], pattern: str) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        line = capsys.readouterr().err.rstrip("\n").split("\n")[-1]  # after any progress bar of a model loading
        assert re.match(r"quickmerge [a-z -]+: error: ", line), line
        assert re.search(pattern, line), line
        return line

    return check


def alive_after_call(norm: torch.nn.Module, call) -> list:
    """Run ``call()``; return the input and output tensors of every ``norm`` call in it that are still alive after it
    returned and its result was dropped (a patched model should hold none of them between calls)."""
    import weakref

    seen = []
    hook = norm.register_forward_hook(lambda _m, args, out: seen.extend([weakref.ref(args[0]), weakref.ref(out)]))
    try:
        call()
    finally:
        hook.remove()
    assert seen, "the norm never ran"
    return [ref() for ref in seen if ref() is not None]
