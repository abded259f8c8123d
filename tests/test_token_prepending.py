"""Token Prepending (mixsp_core.models.token_prepending) on a tiny random Llama decoder.

The decoder is built from a LlamaConfig (4 layers, 32 wide) with MiniLM's WordPiece tokenizer: the
mechanism is checked, not the quality. The measured dev numbers (SmolLM2-135M) are in the module doc.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mixsp_core.errors import ConfigError
from mixsp_core.models.token_prepending import (PROMPTEOL, DecoderEncoder, check_layer_range, clean_sentence,
                                                split_prompt)
from mixsp_core.tracking.tracker import NullTracker
from mixsp_core.training.config import config_from_dict
from mixsp_core.training.loop import run_training
from tests.train_helpers import one_thread, small_pairs

_single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

SENTENCES = ["A man is playing a guitar.", "Two dogs run", "Is the shop open today?", "A cat."]
LAYERS = 4


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, minilm_dir) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaModel(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _plain_model(path: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def test_prompt_helpers():
    assert split_prompt(PROMPTEOL) == ("This sentence :", ' "', '" means in one word:"')
    assert clean_sentence("Two dogs run") == "Two dogs run."
    assert clean_sentence('He said "hi".') == "He said 'hi'."
    assert clean_sentence("Is it open?") == "Is it open."
    with pytest.raises(ValueError, match="exactly once"):
        split_prompt("no slot")


def test_tokens_are_the_whole_prompt_plus_one_placeholder(tiny_llama_dir):
    off = DecoderEncoder(tiny_llama_dir, device="cpu")
    on = DecoderEncoder(tiny_llama_dir, token_prepending=True, tp_end_layer=3, device="cpu")
    for sentence in SENTENCES:
        text = PROMPTEOL.replace("{text}", clean_sentence(sentence))
        whole = off.tokenizer(text)["input_ids"][:-1]  # without the trailing [SEP]: the last token is the prompt's
        assert off.prompt_ids(sentence) == whole
        with_placeholder = on.prompt_ids(sentence)
        at = len(on.head_ids)
        assert with_placeholder[at] == on.placeholder_id == on.tokenizer.unk_token_id
        assert with_placeholder[:at] + with_placeholder[at + 1:] == whole
    batch = on.tokenize(SENTENCES)
    assert batch.placeholder == len(on.head_ids)
    assert batch.last.tolist() == [len(on.prompt_ids(s)) - 1 for s in SENTENCES]


def test_long_sentence_keeps_the_template_end(tiny_llama_dir):
    enc = DecoderEncoder(tiny_llama_dir, max_length=20, device="cpu")
    ids = enc.prompt_ids("word " * 60)
    suffix = enc.tokenizer('" means in one word:"', add_special_tokens=False)["input_ids"]
    assert len(ids) == 20 and ids[-len(suffix):] == suffix


def test_tp_disabled_equals_plain_model(tiny_llama_dir):
    enc = DecoderEncoder(tiny_llama_dir, normalize=False, device="cpu")
    plain = _plain_model(tiny_llama_dir)
    vectors = enc.encode(SENTENCES, batch_size=3, show_progress=False)  # padded batches of mixed lengths
    with torch.inference_mode():
        expected = [plain(input_ids=torch.tensor([enc.prompt_ids(s)])).last_hidden_state[0, -1].numpy()
                    for s in SENTENCES]
    np.testing.assert_allclose(vectors, np.stack(expected), atol=1e-5)


def test_exit_layer_reads_that_layers_hidden_state(tiny_llama_dir):
    enc = DecoderEncoder(tiny_llama_dir, exit_layer=2, normalize=False, device="cpu")
    plain = _plain_model(tiny_llama_dir)
    with torch.inference_mode():
        states = plain(input_ids=torch.tensor([enc.prompt_ids(SENTENCES[0])]), output_hidden_states=True)
    np.testing.assert_allclose(enc.encode(SENTENCES[:1], show_progress=False)[0],
                               states.hidden_states[2][0, -1].numpy(), atol=1e-5)


def _record_layer_io(layers):
    """Each layer's input and output, recorded by hooks registered after Token Prepending's (so the input
    is what the layer really ran on)."""
    inputs, outputs, handles = {}, {}, []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: inputs.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True))
        handles.append(layer.register_forward_hook(
            lambda m, args, out, i=i: outputs.__setitem__(i, (out[0] if isinstance(out, tuple) else out).clone())))
    return inputs, outputs, handles


def test_placeholder_takes_the_previous_layers_last_token_state(tiny_llama_dir):
    enc = DecoderEncoder(tiny_llama_dir, token_prepending=True, tp_start_layer=1, tp_end_layer=3,
                         normalize=False, device="cpu")
    batch = enc.tokenize(SENTENCES)
    inputs, outputs, handles = _record_layer_io(enc.layers)
    with torch.inference_mode():
        enc.hidden_states(batch)
    for handle in handles:
        handle.remove()
    rows, pst = torch.arange(len(SENTENCES)), batch.placeholder
    for layer in (1, 2):  # inside [start, end): the placeholder's input is layer-1's last-token output
        torch.testing.assert_close(inputs[layer][rows, pst], outputs[layer - 1][rows, batch.last])
    for layer in (0, 3):  # outside: untouched, the previous layer's own output at the placeholder
        before = inputs[layer][rows, pst]
        assert not torch.allclose(before, inputs[layer][rows, batch.last])
        if layer:
            torch.testing.assert_close(before, outputs[layer - 1][rows, pst])


def test_sentence_tokens_attend_to_the_prepended_state(tiny_llama_dir):
    enc = DecoderEncoder(tiny_llama_dir, token_prepending=True, tp_start_layer=1, tp_end_layer=3,
                         normalize=False, device="cpu", attn_implementation="eager")
    batch = enc.tokenize(SENTENCES[:1])
    pst, last = batch.placeholder, int(batch.last[0])
    with torch.inference_mode():
        tp_states, output = enc.hidden_states(batch, output_attentions=True)
        plain_states = enc.model(input_ids=batch.ids, attention_mask=batch.mask).last_hidden_state  # hooks idle
    for layer in (1, 2):
        to_placeholder = output.attentions[layer][0, :, pst + 1:last + 1, pst]  # heads x later tokens
        assert bool((to_placeholder > 1e-4).all())
    # causal: tokens before the placeholder cannot see it; every token after it changes
    torch.testing.assert_close(tp_states[0, :pst], plain_states[0, :pst])
    moved = (tp_states[0, pst + 1:last + 1] - plain_states[0, pst + 1:last + 1]).abs().amax(dim=-1)
    assert bool((moved > 1e-4).all())


def test_layer_range_errors_name_the_field(tiny_llama_dir):
    with pytest.raises(ConfigError) as err:
        DecoderEncoder(tiny_llama_dir, token_prepending=True, tp_end_layer=LAYERS + 1, device="cpu")
    assert err.value.field == "model.tp_end_layer"
    with pytest.raises(ConfigError) as err:
        DecoderEncoder(tiny_llama_dir, exit_layer=LAYERS + 1, device="cpu")
    assert err.value.field == "model.exit_layer"
    for args, field in [((4, True, 3, 3, 0), "model.tp_start_layer"), ((4, True, 1, 4, 2), "model.tp_end_layer")]:
        with pytest.raises(ConfigError) as err:
            check_layer_range(*args)
        assert err.value.field == field
    check_layer_range(4, False, 9, 9, 0)  # TP off: its layers are not read


@pytest.mark.parametrize("model, field", [
    ({"token_prepending": True}, "model.token_prepending"),
    ({"exit_layer": 3}, "model.exit_layer"),
    ({"kind": "bi", "decoder_prompt": PROMPTEOL}, "model.decoder_prompt"),
    ({"decoder_prompt": "no slot"}, "model.decoder_prompt"),
    ({"decoder_prompt": PROMPTEOL, "tp_start_layer": 5, "tp_end_layer": 5}, "model.tp_end_layer"),
    ({"decoder_prompt": PROMPTEOL, "tp_start_layer": -1}, "model.tp_start_layer"),
    ({"decoder_prompt": PROMPTEOL, "token_prepending": True, "exit_layer": 4, "tp_end_layer": 7},
     "model.tp_end_layer"),
])
def test_config_errors_name_the_field(model, field):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"kind": "encoder", **model}})
    assert err.value.field == field


def test_run_training_evaluates_the_decoder_on_dev(tiny_llama_dir, senteval_dir, tmp_path):
    pairs = small_pairs(senteval_dir, n_train=8, n_dev=12)
    for tp in (False, True):
        config = config_from_dict({"name": f"tp-{tp}", "model": {
            "kind": "encoder", "encoder": str(tiny_llama_dir), "decoder_prompt": PROMPTEOL,
            "token_prepending": tp, "tp_start_layer": 1, "tp_end_layer": 3}, "tracking": {"enabled": False}})
        result = run_training(config, pairs, out_dir=tmp_path / f"tp-{tp}", tracker=NullTracker(),
                              show_progress=False)
        assert result.best_checkpoint is None and result.steps == 0
        assert set(result.best_metrics) >= {"STSBenchmark-dev", "SICK-trial", "primary"}
        assert all(-100 <= v <= 100 for v in result.best_metrics.values())
        assert (tmp_path / f"tp-{tp}" / "metrics.json").is_file()
